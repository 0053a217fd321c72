"""BERT-family encoders from transformers: BERT, RoBERTa, ELECTRA (same layer layout) and DistilBERT."""

from __future__ import annotations

from typing import Any

from torch import nn

from instatune_cli.adapters.base import FamilyAdapter, LayerParts
from instatune_cli.space import ModelDims


class BertFamilyAdapter(FamilyAdapter):
    """`encoder.layer[i].attention.self.{query,key,value}`, `.attention.output.dense`,
    `.intermediate.dense`, `.output.dense` — shared by BERT, RoBERTa and ELECTRA."""

    family = "bert"
    model_types = ("bert", "roberta", "electra", "xlm-roberta", "camembert")

    def dims(self, config: Any) -> ModelDims:
        return ModelDims(
            family=self.family,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            hidden=config.hidden_size,
            ffn=config.intermediate_size,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            type_vocab_size=getattr(config, "type_vocab_size", 0) or 0,
            num_labels=config.num_labels,
            embedding_size=getattr(config, "embedding_size", 0) or 0,
        )

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.encoder.layer

    def parts(self, layer: nn.Module) -> LayerParts:
        att = layer.attention
        return LayerParts(att.self.query, att.self.key, att.self.value, att.output.dense,
                          layer.intermediate.dense, layer.output.dense)


class DistilBertAdapter(FamilyAdapter):
    """`transformer.layer[i].attention.{q,k,v,out}_lin`, `.ffn.lin1/lin2`."""

    family = "distilbert"
    model_types = ("distilbert",)

    def dims(self, config: Any) -> ModelDims:
        return ModelDims(
            family=self.family,
            num_layers=config.n_layers,
            num_heads=config.n_heads,
            head_dim=config.dim // config.n_heads,
            hidden=config.dim,
            ffn=config.hidden_dim,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            type_vocab_size=0,
            num_labels=config.num_labels,
        )

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.transformer.layer

    def parts(self, layer: nn.Module) -> LayerParts:
        a = layer.attention
        return LayerParts(a.q_lin, a.k_lin, a.v_lin, a.out_lin, layer.ffn.lin1, layer.ffn.lin2)
