"""BERT-family encoders from transformers: BERT, RoBERTa, ELECTRA (same layer layout) and DistilBERT.

`HFTextAdapter` is what every transformers text classifier shares (Auto loading, fast tokenizers, token-id
inputs, `save_pretrained` layout); extraction and the closed-form MACs of these encoders live in
`instatune_cli.extract` and `instatune_cli.measure.macs`, which this family calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from instatune_cli.adapters import model_family, register_family
from instatune_cli.adapters.base import FamilyAdapter, LayerParts
from instatune_cli.errors import InstatuneError
from instatune_cli.space import ModelDims, SubNet

if TYPE_CHECKING:
    import torch


#: model types that are RoBERTa under another name (the one alias table; `adapters.model_family`)
ROBERTA_ALIASES = {"xlm-roberta": "roberta", "camembert": "roberta"}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def label_kwargs(id2label: dict[int, str] | None, num_labels: int | None) -> dict[str, Any]:
    """`from_pretrained` keywords for the task's classes (names when known, else just their count)."""
    if id2label is not None:
        return {"num_labels": len(id2label), "id2label": dict(id2label),
                "label2id": {v: k for k, v in id2label.items()}}
    return {"num_labels": num_labels} if num_labels is not None else {}


class HFTextAdapter(FamilyAdapter):
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
        from instatune_cli.export import optimize_graph

        return optimize_graph(onnx_path, onnx_path)

    def load(self, src: str, *, id2label: dict[int, str] | None = None, num_labels: int | None = None,
             eager: bool = False) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from instatune_cli.adapters import adapter_for
        from instatune_cli.extract import is_per_layer_dir

        if is_per_layer_dir(src):  # an extract (or a run recovered from one): our loader, never its model file
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
            raise InstatuneError(f"cannot load model {src!r}{what}: {_first_line(e)[:300]}") from None
        return model

    def _load_per_layer(self, src: str, id2label: dict[int, str] | None, num_labels: int | None,
                        eager: bool) -> nn.Module:
        """Our per-layer classifier keeps its classifier: the task must have its number of classes."""
        from instatune_cli.extract import load_extracted

        model = load_extracted(src, **({"attn_implementation": "eager"} if eager else {}))
        want = len(id2label) if id2label is not None else num_labels
        if want is not None and want != model.config.num_labels:
            raise InstatuneError(f"cannot load model {src!r} as a {want}-class classifier: it is a per-layer "
                                 f"sub-network with a {model.config.num_labels}-class classifier")
        if id2label is not None:
            model.config.id2label = dict(id2label)
            model.config.label2id = {v: k for k, v in id2label.items()}
        model._instatune_adapter = self
        return model

    def load_config(self, src: str) -> Any:
        from transformers import AutoConfig

        from instatune_cli.extract import extracted_config, is_per_layer_dir

        if is_per_layer_dir(src):
            return extracted_config(src)
        try:
            return AutoConfig.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise InstatuneError(f"cannot load model {src!r}: {_first_line(e)}") from None

    def max_length(self, requested: int, preprocessor: Any, config: Any, dims: ModelDims) -> int:
        n = requested
        tml = getattr(preprocessor, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:
            n = min(n, tml)
        offset = 2 if model_family(config.model_type) == "roberta" else 0  # RoBERTa's padding_idx
        if dims.max_positions:
            n = min(n, dims.max_positions - offset)
        return n

    def forward(self, model: nn.Module, inputs: dict[str, Any], hidden_states: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        out = model(**inputs, output_hidden_states=True) if hidden_states else model(**inputs)
        return out.logits, (out.hidden_states if hidden_states else None)

    def load_saved(self, model_dir: str | Path, *, eager: bool = False) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        from instatune_cli.extract import is_per_layer_dir, load_extracted

        kw: dict[str, Any] = {"attn_implementation": "eager"} if eager else {}
        if is_per_layer_dir(model_dir):  # a run recovered from a per-layer extract
            model = load_extracted(model_dir, **kw)
            model._instatune_adapter = self
            return model
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kw)

    def load_preprocessor(self, src: str | Path) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src))
        except Exception as e:  # noqa: BLE001 - missing/garbled tokenizer files raise many types
            raise InstatuneError(f"cannot load a tokenizer from {src} ({_first_line(e)}); pass --tokenizer") from None
        if not getattr(tok, "is_fast", False):
            raise InstatuneError(f"the tokenizer of {src} is not a fast tokenizer; instatune needs tokenizer.json")
        return tok

    def save(self, model: nn.Module, preprocessor: Any, out_dir: str | Path) -> None:
        if str(model.config.model_type).startswith("instatune_"):  # per-layer: the layout of its extract
            from instatune_cli.extract import save_per_layer

            save_per_layer(model, Path(out_dir))
        else:
            model.save_pretrained(out_dir)
        if preprocessor is not None:
            preprocessor.save_pretrained(out_dir)
        from instatune_cli.extract import readable_files

        readable_files(out_dir)  # safetensors writes 0600

    def encode(self, preprocessor: Any, split: Any, max_length: int, train: bool = False) -> Any:
        from instatune_cli.data import tokenize

        return tokenize(preprocessor, split, max_length)

    def eval_batches(self, encoded: Any, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        from instatune_cli.data import eval_batches

        return eval_batches(encoded, batch_size)

    def input_names(self, model_or_config: Any) -> list[str]:
        from instatune_cli.extract import input_names

        return input_names(model_or_config)

    def random_batch(self, model_or_config: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
        from instatune_cli.extract import random_batch

        return random_batch(getattr(model_or_config, "config", model_or_config), batch, seq_len, seed)

    def macs(self, dims: ModelDims, sub: SubNet, seq: int) -> int:
        from instatune_cli.measure.macs import total_macs

        return total_macs(dims, sub, seq)

    def params(self, dims: ModelDims, sub: SubNet) -> int:
        from instatune_cli.measure.macs import params

        return params(dims, sub)

    def extract(self, model: nn.Module, sub: SubNet) -> nn.Module:
        from instatune_cli.extract import extract_model

        small = extract_model(model, sub)
        small._instatune_adapter = self  # its per-layer model_type is ours, the family stays this one
        return small

    def save_extracted(self, small: nn.Module, parent: nn.Module, sub: SubNet, preprocessor: Any,
                       out_dir: str | Path) -> dict[str, Any]:
        from instatune_cli.extract import write_hf_extracted

        return write_hf_extracted(small, parent, sub, preprocessor, Path(out_dir))

    def load_extracted(self, model_dir: str | Path) -> nn.Module:
        from instatune_cli.extract import load_extracted

        model = load_extracted(model_dir)
        model._instatune_adapter = self
        return model


@register_family
class BertFamilyAdapter(HFTextAdapter):
    """`encoder.layer[i].attention.self.{query,key,value}`, `.attention.output.dense`,
    `.intermediate.dense`, `.output.dense` — shared by BERT, RoBERTa and ELECTRA."""

    family = "bert"
    model_types = ("bert", "roberta", "electra", "xlm-roberta", "camembert")
    aliases = ROBERTA_ALIASES

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
