"""BERT-family encoders from transformers: BERT, RoBERTa (XLM-R, CamemBERT), ELECTRA (same layer layout) and
DistilBERT.

`HFTextAdapter` is what every transformers text classifier shares (Auto loading, fast tokenizers, token-id
inputs, `save_pretrained` layout, ONNX Runtime's transformer fusions of its graphs: `hf/fusion.py`); extraction
to stock or per-layer classes is `hf/extract.py`, the closed-form MACs and params `hf/costs.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli import data as D
from instatune_cli.adapters import adapter_for, model_family, register_family
from instatune_cli.adapters.base import LayerParts
from instatune_cli.adapters.hf import ALIASES, costs, fusion
from instatune_cli.adapters.hf import extract as hx
from instatune_cli.adapters.hf.base import HFAdapter, first_line, label_kwargs
from instatune_cli.artifacts import readable_files
from instatune_cli.errors import InstatuneError
from instatune_cli.space import ModelDims, SubNet

if TYPE_CHECKING:
    import torch
    from torch import nn


def input_names(model_or_config: Any) -> list[str]:
    """Inputs a classifier of this config takes in instatune's checks and ONNX graphs.

    `token_type_ids` only where the model has more than one token type (BERT, ELECTRA): RoBERTa's single
    type and DistilBERT's missing embedding would make it an input nobody's tokenizer fills.
    """
    config = getattr(model_or_config, "config", model_or_config)
    names = ["input_ids", "attention_mask"]
    if (getattr(config, "type_vocab_size", 0) or 0) > 1:
        names.append("token_type_ids")
    return names


def random_batch(config: Any, batch: int, seq_len: int, seed: int = 0,
                 pad: bool = True) -> dict[str, torch.Tensor]:
    """Token ids below the vocabulary size; with `pad`, the first row's tail is padding (mask 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, int(config.vocab_size), (batch, seq_len), generator=g)}
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad and seq_len > 2:
        mask[0, seq_len - seq_len // 3:] = 0
    out["attention_mask"] = mask
    if "token_type_ids" in input_names(config):
        tt = torch.zeros(batch, seq_len, dtype=torch.long)
        tt[:, seq_len // 2:] = 1
        out["token_type_ids"] = tt
    return out


class HFTextAdapter(HFAdapter):
    """transformers `AutoModelForSequenceClassification` + a fast tokenizer."""

    hidden_states = True
    quant_engines = ("ort", "inc")
    vocab_trim = True
    quant_search = True

    def max_sequence_length(self, config: Any) -> int:
        """Longest sequence the position embeddings allow (RoBERTa's positions start after the padding index)."""
        n = int(getattr(config, "max_position_embeddings", 512))
        if model_family(config.model_type) == "roberta":
            n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        return n

    def optimize_onnx(self, onnx_path: Path) -> dict[str, Any] | None:
        return fusion.optimize_graph(onnx_path, onnx_path)

    def load(self, src: str, *, id2label: dict[int, str] | None = None, num_labels: int | None = None,
             eager: bool = False) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if hx.is_per_layer_dir(src):  # an extract (or a run recovered from one): our loader, never its model file
            return self._load_per_layer(src, id2label, num_labels, eager)
        kw = label_kwargs(id2label, num_labels)
        try:
            config = AutoConfig.from_pretrained(src, **kw)
            adapter_for(config.model_type)
            if eager:
                kw["attn_implementation"] = "eager"
            model = AutoModelForSequenceClassification.from_pretrained(src, **kw)
        except InstatuneError:
            raise
        except (OSError, RuntimeError, ValueError) as e:  # missing files, shape/label-count mismatches
            n = kw.get("num_labels")
            what = f" as a {n}-class classifier" if n and not isinstance(e, OSError) else ""
            raise InstatuneError(f"cannot load model {src!r}{what}: {first_line(e)[:300]}") from None
        return model

    def _load_per_layer(self, src: str, id2label: dict[int, str] | None, num_labels: int | None,
                        eager: bool) -> nn.Module:
        """Our per-layer classifier keeps its classifier: the task must have its number of classes."""
        model = hx.load_extracted(src, **({"attn_implementation": "eager"} if eager else {}))
        want = len(id2label) if id2label is not None else num_labels
        if want is not None and want != model.config.num_labels:
            raise InstatuneError(f"cannot load model {src!r} as a {want}-class classifier: it is a per-layer "
                                 f"sub-network with a {model.config.num_labels}-class classifier")
        if id2label is not None:
            model.config.id2label = dict(id2label)
            model.config.label2id = {v: k for k, v in id2label.items()}
        model._instatune_adapter = self
        return model

    def max_length(self, requested: int, preprocessor: Any, config: Any, dims: ModelDims) -> int:
        n = requested
        tml = getattr(preprocessor, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:
            n = min(n, tml)
        if dims.max_positions:
            n = min(n, self.max_sequence_length(config))
        return n

    def forward(self, model: nn.Module, inputs: dict[str, Any], hidden_states: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        out = model(**inputs, output_hidden_states=True) if hidden_states else model(**inputs)
        return out.logits, (out.hidden_states if hidden_states else None)

    def load_saved(self, model_dir: str | Path, *, eager: bool = False) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        kw: dict[str, Any] = {"attn_implementation": "eager"} if eager else {}
        if hx.is_per_layer_dir(model_dir):  # a run recovered from a per-layer extract
            model = hx.load_extracted(model_dir, **kw)
            model._instatune_adapter = self
            return model
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kw)

    def load_preprocessor(self, src: str | Path) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src))
        except Exception as e:  # noqa: BLE001 - missing/garbled tokenizer files raise many types
            raise InstatuneError(f"cannot load a tokenizer from {src} ({first_line(e)}); pass --tokenizer") from None
        if not getattr(tok, "is_fast", False):
            raise InstatuneError(f"the tokenizer of {src} is not a fast tokenizer; instatune needs tokenizer.json")
        return tok

    def save(self, model: nn.Module, preprocessor: Any, out_dir: str | Path) -> None:
        if str(model.config.model_type).startswith("instatune_"):  # per-layer: the layout of its extract
            hx.save_per_layer(model, Path(out_dir))
        else:
            model.save_pretrained(out_dir)
        if preprocessor is not None:
            preprocessor.save_pretrained(out_dir)
        readable_files(out_dir)  # safetensors writes 0600

    def encode(self, preprocessor: Any, split: Any, max_length: int, train: bool = False) -> Any:
        return D.tokenize(preprocessor, split, max_length)

    def eval_batches(self, encoded: Any, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        return D.eval_batches(encoded, batch_size)

    def input_names(self, model_or_config: Any) -> list[str]:
        return input_names(model_or_config)

    def random_batch(self, model_or_config: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
        return random_batch(getattr(model_or_config, "config", model_or_config), batch, seq_len, seed)

    def macs(self, dims: ModelDims, sub: SubNet, seq: int) -> int:
        return costs.total_macs(dims, sub, seq)

    def params(self, dims: ModelDims, sub: SubNet) -> int:
        return costs.params(dims, sub)

    def save_extracted(self, small: nn.Module, parent: nn.Module, sub: SubNet, preprocessor: Any,
                       out_dir: str | Path) -> dict[str, Any]:
        return hx.write_hf_extracted(small, parent, sub, preprocessor, Path(out_dir))

    def load_extracted(self, model_dir: str | Path) -> nn.Module:
        model = hx.load_extracted(model_dir)
        model._instatune_adapter = self
        return model


@register_family
class BertFamilyAdapter(HFTextAdapter):
    """`encoder.layer[i].attention.self.{query,key,value}`, `.attention.output.dense`,
    `.intermediate.dense`, `.output.dense` — shared by BERT, RoBERTa and ELECTRA."""

    family = "bert"
    model_types = ("bert", "roberta", "electra", "xlm-roberta", "camembert")
    aliases = ALIASES

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


@register_family
class DistilBertAdapter(HFTextAdapter):
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
