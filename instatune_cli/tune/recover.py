"""Recovery fine-tuning: `instatune tune EXTRACT_DIR` fine-tunes an extracted sub-network (README, "Recovery
fine-tuning"; docs/architecture.md, "Recovery fine-tuning").

An extract directory is checked against its manifest before anything is loaded (every file's sha256, the
per-layer `modeling_instatune_bert.py` / `modeling_instatune_vit.py` included), then loaded by instatune's own
loader (the family's `load`: for a per-layer directory `extract.load_extracted`, or the timm family's
`load_extracted` with the class file instatune ships), never by running the copied model file.

What the run takes from the extract's parent tune run (found through the manifest chain extract -> search ->
tune, each parent's digest checked; `tune_of`):

- the data options when neither --task nor --data is given (task, files, columns, limits, validation split,
  metric), and in every case (unless --val-data) the seed the parent carved its validation split with, so the
  recovered run's validation split is the parent's: its search selects on rows the extract never trained on;
- `--teacher parent`: the parent tune run as the strong teacher (its full super-network scores the training
  set once; tune/teacher.py);
- `--max-length` when not given, in every case: the extract learned on inputs truncated where its parent's were.
  A value given that truncates otherwise is used and noted in one line (`check_encoding`), as is a `--tokenizer`
  other than the one the extract carries (its parent's). Images need nothing: the preprocessing (input size,
  crop, mean/std) travels in the extract's `preprocessor_config.json` and no option changes it.

The extract's classifier is kept, so the data must have its classes (a task with other labels is refused).

A per-layer model (heads and FFN width of its own in every layer) gets a space derived from that shape
(`space_for`): every layer kept, since depth is not elastic there (genes are by position among the kept
layers, so a shallower cut would bound each gene by another layer's width), and per layer the head counts of
the original model's grid up to what the layer has, and thirds of its FFN width. `--plain` is the recovery
fine-tune; an elastic run trains that space. The run's `model/` is written like the extract (the per-layer
class file beside the weights, `auto_map`), so it reloads with `load_extracted` or stock transformers with
`trust_remote_code=True`, and extracting its full network gives back a per-layer directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli import artifacts
from instatune_cli.adapters import per_layer_dir
from instatune_cli.data import REGRESSION_LABELS
from instatune_cli.errors import InstatuneError
from instatune_cli.extract import per_layer_shape
from instatune_cli.space import DEFAULT_DEPTH, SearchSpace

if TYPE_CHECKING:
    from instatune_cli.artifacts import Artifact
    from instatune_cli.space import ModelDims, SearchSpace
    from instatune_cli.tune.config import TuneConfig

#: `--teacher parent`: the tune run the extract was cut from
PARENT = "parent"
#: options a recovery run takes from the parent tune run when it is given no data
DATA_OPTIONS = ("task", "data", "eval_data", "text_column", "text_pair_column", "label_column", "limit_train",
                "limit_eval", "val_split", "val_data", "metric")


def load_extract(path: str | Path) -> Artifact:
    """The extract at `path`, every file checked against its manifest; a missing or edited file (the per-layer
    model file included) is one line."""
    try:
        return artifacts.load(path, "extract")
    except InstatuneError as e:
        raise InstatuneError(f"{e}; instatune fine-tunes an extract only as `instatune extract` wrote it: "
                             "re-run extract to remake it") from None


def check_unlisted_per_layer(path: Path) -> None:
    """Refuse a per-layer model directory no manifest vouches for (its model file cannot be checked): allowed are
    an extract (its own manifest.json) and the `model/` of a tune run (the run's manifest lists it)."""
    if not _per_layer_dir(path):
        return
    run = path.resolve().parent
    try:
        m = json.loads((run / "manifest.json").read_text())
        if m.get("stage") == "tune" and m.get("model", {}).get("model_dir", "model") == path.resolve().name:
            artifacts.load(run, "tune")  # every file of model/ as the run wrote it
            return
    except (OSError, ValueError, AttributeError):
        pass
    raise InstatuneError(f"{path} holds a per-layer instatune model but no manifest.json lists its files, so its "
                         "model file cannot be checked; give the extract directory `instatune extract` wrote (or "
                         "the tune run) instead of a copy")


def resolve_model_dir(src: str) -> tuple[str, dict[str, Any] | None]:
    """A tune-run directory stands for its model: (model dir, run manifest); an extract directory is its own
    model once every file matches its manifest (below); anything else is returned as is."""
    p = Path(src).expanduser()
    man = p / "manifest.json"
    if p.is_dir() and man.is_file():
        art = artifacts.load(p, ("tune", "extract"), verify=False)
        if art.stage == "extract":
            return str(p), load_extract(p).manifest
        sub = art.model.get("model_dir", "model")
        return str(p / sub), art.manifest
    if p.is_dir():
        check_unlisted_per_layer(p)
    return src, None


def _per_layer_dir(path: Path) -> bool:
    """A per-layer model directory of a family whose per-layer models instatune loads itself (the family says:
    `FamilyAdapter.is_per_layer_dir`)."""
    return per_layer_dir(path)


@dataclass
class ExtractSource:
    """A tune run's starting point when MODEL is an extract: the checked extract and its parent tune run."""

    path: Path
    artifact: Artifact
    tune: Artifact | None              # None when the parent run is gone or changed (`parent_note` says why)
    parent_note: str | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)
    data_from_parent: bool = False
    val_seed: int | None = None
    teacher: str | None = None          # "parent" when --teacher named the parent tune run
    max_length_from_parent: bool = False
    notes: list[str] = field(default_factory=list)  # one line each: options given that differ from the parent's

    @property
    def kind(self) -> str:
        return str(self.artifact.metrics.get("kind", "stock"))

    @property
    def digest(self) -> str:
        return self.artifact.digest

    @property
    def subnet_name(self) -> str:
        return str(self.artifact.model.get("subnet_name", "?"))

    def record(self) -> dict[str, Any]:
        """What the run's manifest says about its start (`model.source_extract`)."""
        m, x = self.artifact.model, self.artifact.metrics
        return {"path": str(self.path.resolve()), "digest": self.digest, "kind": self.kind,
                "subnet": m.get("subnet"), "subnet_id": m.get("subnet_id"), "subnet_name": m.get("subnet_name"),
                "depth_rule": m.get("depth_rule"), "kept_layers": m.get("kept_layers"), "macs": x.get("macs"),
                "macs_supernet": x.get("macs_supernet"), "params": x.get("params"), "labels": m.get("labels"),
                "parents": self.chain, "parent_note": self.parent_note, "data_from_parent": self.data_from_parent,
                "val_seed": self.val_seed, "teacher": self.teacher,
                "max_length_from_parent": self.max_length_from_parent}

    def summary(self) -> str:
        what = "per-layer" if self.kind == "instatune" else "stock"
        bits = [f"recovery fine-tuning of extract {self.path} ({self.subnet_name}, {what})"]
        if self.data_from_parent and self.tune is not None:
            bits.append(f"data as in its parent run {self.tune.path}")
        if self.max_length_from_parent and self.tune is not None:
            bits.append(f"--max-length {self.tune.options.get('max_length')} as in its parent run")
        if self.val_seed is not None:
            bits.append(f"validation split carved with the parent's seed {self.val_seed}")
        if self.teacher == PARENT and self.tune is not None:
            bits.append(f"teacher: the parent run {self.tune.path}")
        return "; ".join(bits)

    def check_labels(self, labels: list[str]) -> None:
        """The extract keeps its classifier: the data must have exactly its classes (a regressor's one output:
        a regression task, a classifier's classes: a classification task, each said as such)."""
        have = self.artifact.model.get("labels")
        if have is None or [str(x) for x in have] == [str(x) for x in labels]:
            return
        have, labels = [str(x) for x in have], [str(x) for x in labels]
        if REGRESSION_LABELS in (have, labels):
            what = "a regressor (one output)" if have == REGRESSION_LABELS else f"a {len(have)}-class classifier"
            task = "a regression task" if labels == REGRESSION_LABELS else f"a {len(labels)}-class task"
            raise InstatuneError(f"extract {self.path} is {what} but its data here is {task}; recovery fine-tuning "
                                 "keeps the extract's head: give the data and --metric of its own task (or drop "
                                 "them for its parent run's)")
        raise InstatuneError(f"extract {self.path} classifies {have} but the data has labels {labels}; "
                             "recovery fine-tuning keeps the extract's classifier: give the data of its own task "
                             "(or tune its parent model on the new task)")

    def check_encoding(self, cfg: TuneConfig, max_length: int) -> None:
        """Note (not refuse) a given --max-length that truncates otherwise than the parent run did (`max_length`:
        this run's, after the family's limits), and a --tokenizer other than the extract's."""
        parent = self.tune.model.get("max_length") if self.tune is not None else None
        if not self.max_length_from_parent and isinstance(parent, int) and parent != max_length:
            self.notes.append(f"--max-length {cfg.max_length} truncates at {max_length} tokens where the parent run "
                              f"{self.tune.path} truncated at {parent}: the extract learned on the parent's inputs "
                              "(drop --max-length to use its value)")
        if cfg.tokenizer and _tokenizer_spec(cfg.tokenizer) != _tokenizer_spec(self.path):
            self.notes.append(f"--tokenizer {cfg.tokenizer} replaces the tokenizer extract {self.path} carries (its "
                              "parent run's): the extract's embeddings were trained with that one")

    def data_config(self, cfg: TuneConfig) -> TuneConfig:
        """The options the data is loaded with: the parent's seed for carving the validation split."""
        if self.val_seed is None or self.val_seed == cfg.seed:
            return cfg
        return dataclasses.replace(cfg, seed=self.val_seed)


def from_extract(cfg: TuneConfig) -> ExtractSource | None:
    """When MODEL is an extract directory: check it, find its parent tune run, and fill in what the run takes
    from it (module docstring; `cfg` is updated so the manifest's options say what ran). None otherwise."""
    p = Path(cfg.model).expanduser()
    stage = _stage(p)
    if stage != "extract":
        if cfg.teacher == PARENT:
            raise InstatuneError(f"--teacher parent names the tune run an extract was cut from, and {cfg.model} is "
                                 "not an extract directory; give the teacher's directory")
        return None
    art = load_extract(p)
    if art.metrics.get("kind") == "instatune" and not _per_layer_dir(p):
        fam = art.model.get("adapter") or art.model.get("family")
        raise InstatuneError(f"{p} is a per-layer {fam} extract; fine-tuning per-layer extracts is implemented for "
                             "the transformers text families and timm ViTs only: extract a sub-network that keeps "
                             "every head and one FFN width (a stock model) to fine-tune it")
    tune, chain, note = _parent_run(art)
    src = ExtractSource(p, art, tune, note, chain)
    if cfg.task is None and cfg.data is None:
        if tune is None:
            raise InstatuneError(f"no data: pass --task or --data (the parent tune run of extract {p}, whose data it "
                                 f"would use, cannot be read: {note})")
        _inherit_data(cfg, tune)
        src.data_from_parent = True
    if cfg.teacher == PARENT:
        if tune is None:
            raise InstatuneError(f"--teacher parent: the parent tune run of extract {p} cannot be read ({note}); "
                                 "give the teacher's directory")
        cfg.teacher = str(tune.path)
        src.teacher = PARENT
    elif cfg.teacher and tune is not None and _same_dir(cfg.teacher, tune.path):
        src.teacher = PARENT
    if tune is not None and cfg.max_length is None and isinstance(tune.options.get("max_length"), int):
        cfg.max_length = int(tune.options["max_length"])
        src.max_length_from_parent = True
    if tune is not None and cfg.val_data is None:
        seed = tune.options.get("seed")
        src.val_seed = int(seed) if isinstance(seed, int) else None
    return src


def _tokenizer_spec(d: str | Path) -> dict[str, Any] | None:
    """A tokenizer directory's `tokenizer.json` without the truncation and padding a save records (None without
    one): what two tokenizers are compared by."""
    try:
        spec = json.loads((Path(resolve_model_dir(str(d))[0]).expanduser() / "tokenizer.json").read_text())
    except (OSError, ValueError, InstatuneError):
        return None
    return {k: v for k, v in spec.items() if k not in ("truncation", "padding")} if isinstance(spec, dict) else None


def _stage(p: Path) -> str | None:
    try:
        m = json.loads((p / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m.get("stage") if isinstance(m, dict) else None


def _same_dir(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).resolve()
    except OSError:
        return False


def _parent_run(art: Artifact) -> tuple[Artifact | None, list[dict[str, Any]], str | None]:
    """(the tune run behind the extract, the chain [search?, tune] as {stage, path, digest}, why it is missing)."""
    chain: list[dict[str, Any]] = []
    try:
        p = art.parent(("search", "tune"))
        chain.append({"stage": p.stage, "path": str(p.path.resolve()), "digest": p.digest})
        if p.stage == "search":
            p = p.parent("tune")
            chain.append({"stage": "tune", "path": str(p.path.resolve()), "digest": p.digest})
        return p, chain, None
    except InstatuneError as e:
        return None, chain, str(e)


def _inherit_data(cfg: TuneConfig, tune: Artifact) -> None:
    """The parent run's data options (module docstring); a relative path that no longer resolves from here is
    replaced by the absolute file the parent recorded."""
    opts, source = tune.options, tune.manifest.get("data") or {}
    for k in DATA_OPTIONS:
        if getattr(cfg, k) is None and opts.get(k) is not None:
            setattr(cfg, k, opts[k])
    if cfg.data is not None and not Path(cfg.data).expanduser().exists() and source.get("kind") == "files":
        train = Path(str(source.get("train", "")))
        cfg.data = str(train if Path(str(opts.get("data"))).suffix else train.parent)
        if cfg.eval_data is not None and not Path(cfg.eval_data).expanduser().exists() and source.get("eval"):
            cfg.eval_data = str(source["eval"])


# ---- per-layer models: their own space ----------------------------------------------------------------

def space_for(spec: str | None, dims: ModelDims, config: Any) -> SearchSpace:
    """The run's space: `SearchSpace.resolve` for a uniform model; for a per-layer one (module docstring) the space
    derived from its shape, or the user's, checked against every layer."""
    shape = per_layer_shape(config)
    if shape is None:
        return SearchSpace.resolve(spec, dims)
    heads, ffn = shape
    if spec is None:
        return per_layer_space(dims, heads, ffn)
    space = SearchSpace.resolve(spec, dims)
    check_per_layer(space, heads, ffn)
    return space


def per_layer_space(dims: ModelDims, heads: tuple[int, ...], ffn: tuple[int, ...]) -> SearchSpace:
    """Every layer; per layer the choices a uniform model of the same dims would get (`SearchSpace.from_model`:
    heads from half to all of the original count, thirds of the widest layer's FFN) up to what the layer has, and
    its own size. One grid for every layer, so cuts that keep one width everywhere exist where the shape allows."""
    h_grid = {max(1, round(dims.num_heads * k / 6)) for k in range(3, 7)}
    f_grid = {max(1, round(dims.ffn * k / 3)) for k in range(1, 4)}  # dims.ffn: the widest layer's
    h = [sorted({x for x in h_grid if x <= n} | {n}) for n in heads]
    f = [sorted({x for x in f_grid if x <= w} | {w}) for w in ffn]
    return SearchSpace.from_dict({"layers": [len(heads)], "heads": h, "ffn": f, "seq_len": dims.image_tokens or 128,
                                  "depth": DEFAULT_DEPTH}, name=f"derived-{dims.family}-per-layer")


def check_per_layer(space: SearchSpace, heads: tuple[int, ...], ffn: tuple[int, ...]) -> None:
    """A space for a per-layer model keeps every layer and stays within each layer's heads and width."""
    n = len(heads)
    if tuple(space.layers) != (n,):
        raise InstatuneError(f"the model is a per-layer sub-network of {n} layers, where depth is not elastic; the "
                             f"space's layer choices {list(space.layers)} must be [{n}] (or drop --space)")
    for i in range(n):
        if space.heads[i][-1] > heads[i] or space.ffn[i][-1] > ffn[i]:
            raise InstatuneError(f"the space allows {space.heads[i][-1]} heads and FFN width {space.ffn[i][-1]} in "
                                 f"layer {i}, which has {heads[i]} heads and width {ffn[i]}; lower the choices (or "
                                 "drop --space for the space derived from the model)")
