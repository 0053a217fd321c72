"""The `extract` and `export` stages: from a searched (or named) sub-network to a model a user ships.

extract: SEARCH_DIR + subnet number, or TUNE_DIR + config -> a standalone model directory (stage "extract")
holding only the sliced weights, the tokenizer and the manifest, verified against the super-network; the
manifest records the tune run's depth rule and which of its layers were kept (`kept_layers`).
export: an extract directory (or, chained, a search/tune directory) -> `model.onnx` with dynamic axes, ORT
parity on real validation inputs, ORT latency of the sub-network and of the full super-network (stage
"export"); `--int8` adds `model.int8.onnx`: static INT8 under the joint search's policy for the sub-network when
there is one (as `quantize` does), else ONNX Runtime dynamic INT8, and says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instatune_cli import artifacts
from instatune_cli.adapters import adapter_of
from instatune_cli.errors import InstatuneError
from instatune_cli.export import check_parity, export_onnx, ort_feed, ort_session, quantize_dynamic_int8
from instatune_cli.extract import full_subnet, save_extracted
from instatune_cli.measure.latency import LatencyOptions, measure_ort_latency
from instatune_cli.measure.metrics import eval_score
from instatune_cli.measure.size import onnx_bytes, weights_bytes
from instatune_cli.quantize.ort_engine import quantize_onnx
from instatune_cli.quantize.targets import architecture_of, torch_targets
from instatune_cli.search.stage import front_member, searched_policy
from instatune_cli.space import SubNet
from instatune_cli.tune import load_eval_batches, load_tuned, run_family, run_metric

DEFAULT_SEARCH_DIR = "run-search"


@dataclass
class ExtractOptions:
    """What `extract` cuts: sub-network `subnet` of a search directory's front, or `config` (a name such as
    L10-h10-f2048, a JSON file or inline JSON) of a tune run."""

    subnet: int | None = None
    config: str | None = None


@dataclass
class ExportOptions:
    """Options of the `export` stage. `subnet` / `config` pick the sub-network when it chains extract; the
    latency fields are `measure.latency.LatencyOptions`' (seq_len None: 128, or the model's maximum when shorter);
    `atol` bounds |ONNX - PyTorch| on the logits; `compare_full` also times the super-network."""

    subnet: int | None = None
    config: str | None = None
    int8: bool = False
    batch: int = LatencyOptions.batch
    seq_len: int | None = LatencyOptions.seq_len
    threads: int | None = LatencyOptions.threads
    runs: int = LatencyOptions.runs
    atol: float = 1e-4
    compare_full: bool = True


@dataclass(frozen=True)
class ExtractResult(artifacts.StageResult):
    """A committed extract directory and the figures `instatune extract` prints (its manifest's metrics)."""

    subnet_name: str
    kind: str  # "stock" (loads with transformers alone) or "per-layer" (our classes beside the weights)
    architecture: str
    params: int
    params_closed_form: int
    weights_bytes: int
    macs: int
    macs_reduction: float  # share of the super-network's MACs the sub-network saves
    max_abs_diff: float  # largest |logit| difference against the super-network with the sub-network active
    load_with: str


@dataclass(frozen=True)
class ExportResult(artifacts.StageResult):
    """A committed export directory and the figures `instatune export` prints (its manifest's metrics; each
    latency as `measure.latency.measure_ort_latency` gives it)."""

    onnx: Path
    onnx_bytes: int
    parity: dict[str, Any]
    latency: dict[str, Any]
    latency_supernet: dict[str, Any] | None  # None: compare_full off
    speedup: float | None
    int8: dict[str, Any] | None  # model.int8.onnx's size, latency, agreement and accuracy; None without int8
    int8_onnx: Path | None


def parse_config(spec: str) -> SubNet:
    """A sub-network from a name (`L10-h10-f2048`), a JSON file, or inline JSON."""
    s = spec.strip()
    if s.startswith("{"):
        try:
            return SubNet.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise InstatuneError(f"--config is not valid JSON: {e.msg}") from None
    p = Path(s)
    if p.suffix.lower() == ".json":
        if not p.is_file():
            raise InstatuneError(f"config file {p} does not exist")
        try:
            return SubNet.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise InstatuneError(f"{p} is not valid JSON: {e.msg}") from None
    return SubNet.parse_name(s)


@dataclass
class Source:
    """What to extract: the tune run holding the weights, the sub-network, and the artifact to cite as parent."""

    tune: artifacts.Artifact
    sub: SubNet
    parent: artifacts.Artifact
    label: str


def resolve_source(src: str | Path, subnet: int | None, config: str | None) -> Source:
    art = artifacts.load(src, ("search", "tune"))
    if art.stage == "search":
        if subnet is None:
            raise InstatuneError(f"{art.path} is a search result; say which sub-network with --subnet N")
        if config is not None:
            raise InstatuneError("give either --subnet (with a search directory) or --config, not both")

        _, row = front_member(art.path, subnet)
        tune = art.parent("tune")
        return Source(tune, SubNet.from_dict(row).architecture, art, f"subnet{subnet}")
    if subnet is not None:
        raise InstatuneError("--subnet needs a search directory; with a tune run use --config")
    if config is None:
        raise InstatuneError(f"{art.path} is a tune run; name the sub-network with --config (e.g. L4-h12-f1536)")
    sub = parse_config(config)
    return Source(art, sub, art, sub.name)


def _real_batches(tune: artifacts.Artifact, tok: Any, n: int = 16) -> list[dict[str, Any]]:
    """Two batches of real validation inputs differing in batch size and (usually) length, so the checks
    cover both dynamic axes."""
    batches = load_eval_batches(tune, tok, batch_size=max(2, n // 2), limit=n)
    out = [{k: v for k, v in b.items() if k != "labels"} for b in batches[:2]]
    if len(out) == 2:
        out[1] = {k: v[:3] for k, v in out[1].items()}
    return out


def extract_stage(src: str | Path, output: str | Path | None, opts: ExtractOptions | None = None, *,
                  force: bool = False, **fields: Any) -> ExtractResult:
    """Cut the sub-network `opts` names out of a search or tune directory into `output` (default
    SOURCE-subnetN / SOURCE-NAME). `fields`: ExtractOptions' fields instead of `opts`."""
    opts = artifacts.stage_options(ExtractOptions, opts, fields)
    subnet, config = opts.subnet, opts.config
    s = resolve_source(src, subnet, config)
    out = Path(output) if output else default_extract_output(s)
    artifacts.check_output(out, force, inputs=artifacts.lineage(s.parent))  # before the model is loaded
    model, tok, space, tune = load_tuned(s.tune.path)
    space.check(s.sub)
    with artifacts.StageWriter(out, "extract", {"source": str(src), "subnet": subnet, "config": config},
                               parent=s.parent, reads=(s.tune,), force=force) as w:
        info = save_extracted(model, s.sub, tok, w.path, batches=_real_batches(tune, tok))
        fam = adapter_of(model)
        dims = fam.dims_of(model)
        seq = fam.seq_len(dims, space.seq_len)
        full = full_subnet(model)
        info["macs"] = fam.macs(dims, s.sub, seq)
        info["macs_supernet"] = fam.macs(dims, full, seq)
        info["macs_reduction"] = 1 - info["macs"] / info["macs_supernet"]
        info["seq_len"] = seq
        # The depth rule decides which super-network layers were kept (docs/architecture.md, "Depth rule");
        # the model section carries them too, so the export stage's manifest (a copy of it) records them.
        model_info = {**tune.model, "subnet": s.sub.to_dict(), "subnet_id": s.sub.id, "subnet_name": s.sub.name,
                      "depth_rule": info["depth_rule"], "kept_layers": info["kept_layers"]}
        made = w.commit(model=model_info, metrics=info)
    return ExtractResult.of(made, subnet_name=made.model["subnet_name"])


def chained_extract(art: artifacts.Artifact, subnet: int | None, config: str | None, force: bool,
                    say: Any) -> artifacts.Artifact:
    """The extract a chained `export`/`quantize` of a search or tune directory works from: the one already at
    the default place when it is this sub-network of this very parent (the README's `quantize run-search
    --subnet 3` then `export run-search --subnet 3 --int8`), else a new one; a different extract there is
    remade only with --force (one line otherwise)."""
    s = resolve_source(art.path, subnet, config)
    out = default_extract_output(s)
    if artifacts.lexists(out) and not artifacts.lexists(out.with_name(out.name + ".partial")):
        try:
            have = artifacts.load(out, "extract")
        except InstatuneError:
            have = None
        par = (have.manifest.get("parent") or {}) if have is not None else {}
        same_sub = have is not None and have.model.get("subnet") == json.loads(json.dumps(s.sub.to_dict()))
        if same_sub and par.get("digest") == s.parent.digest:
            say(f"using the extract of {s.sub.name} already in {out}")
            return have
        if not force:
            what = "another sub-network or parent" if have is not None else "something that is not a usable extract"
            raise InstatuneError(f"{out} holds {what} (not {s.sub.name} of {art.path}); pass --force to remake it, "
                                 "or extract it yourself with -o and export or quantize that directory")
    made = extract_stage(art.path, out, ExtractOptions(subnet=subnet, config=config), force=force).artifact
    say(f"extracted {made.model['subnet_name']} to {made.path}")
    return made


def default_extract_output(s: Source) -> Path:
    return s.parent.path.resolve().parent / f"{s.parent.path.resolve().name}-{s.label}"


def tune_of(art: artifacts.Artifact) -> artifacts.Artifact:
    """The tune run behind an extract directory (its parent, or its parent's parent via the search)."""
    p = art.parent(("search", "tune"))
    return p if p.stage == "tune" else p.parent("tune")


def _latency(onnx: Path, batch: int, seq_len: int, threads: int | None, runs: int) -> dict[str, Any]:
    return measure_ort_latency(onnx, batch, seq_len, threads, runs=runs)


def export_stage(src: str | Path | None, output: str | Path | None, opts: ExportOptions | None = None, *,
                 force: bool = False, notify: Any = None, **fields: Any) -> ExportResult:
    """Export an extracted model to ONNX (chaining extract first when given a search or tune directory; None:
    ./run-search). `notify(text)` hears what was chosen on the way; `fields`: ExportOptions' fields instead of
    `opts`."""
    o = artifacts.stage_options(ExportOptions, opts, fields)
    subnet, config, int8, batch, seq_len, threads, runs, atol, compare_full = (  # seq_len: set below when None
        o.subnet, o.config, o.int8, o.batch, o.seq_len, o.threads, o.runs, o.atol, o.compare_full)
    say = notify or (lambda _msg: None)
    if src is None:
        if not Path(DEFAULT_SEARCH_DIR).is_dir():
            raise InstatuneError(
                f"no directory given and no {DEFAULT_SEARCH_DIR}/ here; pass an extract, search or tune directory")
        src = DEFAULT_SEARCH_DIR
        say(f"using the search result in {Path(src).resolve()}")
    art = artifacts.load(src, ("extract", "search", "tune"))
    if output is not None:  # before a chained extract runs: never over what this stage reads
        artifacts.check_not_input(Path(output), artifacts.lineage(art))
    if art.stage != "extract":
        art = chained_extract(art, subnet, config, force, say)
    elif subnet is not None or config is not None:
        raise InstatuneError(f"{art.path} is already an extracted model; drop --subnet/--config")
    out = Path(output) if output else art.path.resolve().parent / f"{art.path.resolve().name}-onnx"
    tune = tune_of(art)
    opts = {"source": str(src), "subnet": subnet, "config": config, "int8": int8, "batch": batch,
            "seq_len": seq_len, "threads": threads, "runs": runs, "atol": atol}
    with artifacts.StageWriter(out, "export", opts, parent=art, reads=(tune,), force=force) as w:
        fam = run_family(tune)
        model = fam.load_extracted(art.path)
        image_tokens = fam.dims_of(model).image_tokens
        if image_tokens:  # an image model runs at its own size (recorded; the graph has no sequence axis)
            seq_len = image_tokens
        elif seq_len is None:  # the paper's 128, or the model's limit when it is shorter
            seq_len = min(128, fam.max_sequence_length(model.config))
        tok = fam.load_preprocessor(art.path)
        fam.save_preprocessor(tok, w.path)
        onnx = w.path / "model.onnx"
        info: dict[str, Any] = {"export": export_onnx(art.path, onnx)}
        info["parity"] = check_parity(onnx, model, _real_batches(tune, tok), atol=atol)
        info["latency"] = _latency(onnx, batch, seq_len, threads, runs)
        info["onnx_bytes"] = onnx_bytes(onnx)
        info["weights_bytes"] = weights_bytes(art.path)
        if int8:
            q = w.path / "model.int8.onnx"
            with w.scratch(".int8-") as td:
                info["int8"] = _int8(art, tune, model, tok, onnx, q, td)
            info["int8"]["agreement"] = _agreement(q, model, tune, tok, fam)
            info["int8"]["accuracy"] = _int8_accuracy(onnx, q, tune, tok, model)
            info["int8"]["latency"] = _latency(q, batch, seq_len, threads, runs)
            say(info["int8"]["note"])
        if compare_full:
            full_model, _, _, _ = load_tuned(tune.path, verify=False)
            with w.scratch(".full-") as td:  # inside the partial, removed with it
                fam.save(full_model, None, td)
                fo = td / "full.onnx"
                export_onnx(td, fo)
                info["latency_supernet"] = _latency(fo, batch, seq_len, threads, runs)
            info["speedup"] = info["latency_supernet"]["median_ms"] / info["latency"]["median_ms"]
        model_info = {k: v for k, v in art.model.items()}
        made = w.commit(model=model_info, metrics=in_directory(info, w.path))
    return ExportResult.of(made, onnx=made.path / "model.onnx",
                           int8_onnx=made.path / "model.int8.onnx" if int8 else None)


def _int8(art: artifacts.Artifact, tune: artifacts.Artifact, model: Any, tok: Any, onnx: Path,
          q: Path, scratch: Path) -> dict[str, Any]:
    """`model.int8.onnx`: the joint search's policy for this sub-network (calibrated static QDQ, as `quantize`
    does), or, without one, ONNX Runtime dynamic INT8 of every linear; the note says which."""
    policy = searched_policy(art)
    if policy is None:
        info = quantize_dynamic_int8(onnx, q)
        info["note"] = ("INT8 via ONNX Runtime dynamic quantization of every linear (no searched policy for this "
                        "sub-network; `instatune quantize` calibrates static INT8 under a policy)")
        return info

    policy.check_for(architecture_of(model))
    calib = [{k: v for k, v in b.items() if k != "labels"}
             for b in load_eval_batches(tune, tok, batch_size=16, limit=256, which="calib")]
    plain = scratch / "plain.onnx"
    export_onnx(art.path, plain, optimize=False)  # every linear its own node, as the policy names them
    info = quantize_onnx(plain, q, policy, torch_targets(model), calib)
    info["policy"] = policy.to_dict()
    info["note"] = (f"INT8 via the joint search's policy for this sub-network ({policy.summary()}), static QDQ"
                    + (", INT4/weight-only layers as MatMulNBits/GatherBlockQuantized" if any(
                        policy.layers[n] not in ("int8", "fp32") for n in policy.layers) else ""))
    return info


def in_directory(value: Any, work: Path) -> Any:
    """`value` with every path inside the stage's work directory (`<out>.partial`, renamed at commit) written
    relative to it, so a manifest names files that exist after the rename (`model.onnx`, not
    `x-onnx.partial/model.onnx`)."""
    root = str(Path(work))
    if isinstance(value, dict):
        return {k: in_directory(v, work) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [in_directory(v, work) for v in value]
    if isinstance(value, (str, Path)) and str(value).startswith(root + "/"):
        return str(value)[len(root) + 1:]
    return value


def _int8_accuracy(fp32: Path, q: Path, tune: artifacts.Artifact, tok: Any, model: Any) -> dict[str, Any]:
    """The run's metric on the whole eval split for model.onnx and model.int8.onnx (as `quantize` reports it),
    and the change in points (negative: INT8 lost)."""
    batches = load_eval_batches(tune, tok, batch_size=32, which="eval")
    metric, classes = run_metric(tune), int(tune.model.get("num_labels") or model.config.num_labels)
    out: dict[str, Any] = {}
    for key, path in (("fp32", fp32), ("int8", q)):
        sess = ort_session(path)
        names = [i.name for i in sess.get_inputs()]
        out[key] = eval_score(batches, lambda b, s=sess, n=names: s.run(["logits"], {k: ort_feed(b[k]) for k in n})[0],
                              metric, classes)
        out[key]["model"] = path.name
    out["change_points"] = 100 * (out["int8"]["score"] - out["fp32"]["score"])
    return out


def _agreement(onnx: Path, model: Any, tune: artifacts.Artifact, tok: Any, fam: Any, n: int = 64
               ) -> dict[str, Any]:
    """Share of eval examples where INT8 ONNX and FP32 PyTorch predict the same class (INT8 is not bit-exact)."""
    import numpy as np
    import torch

    sess = ort_session(onnx)
    names = [i.name for i in sess.get_inputs()]

    same = total = 0
    worst = 0.0
    for b in load_eval_batches(tune, tok, batch_size=16, limit=n):
        feeds = {k: ort_feed(b[k]) for k in names}
        (q,) = sess.run(["logits"], feeds)
        with torch.no_grad():
            ref = fam.logits(model, {k: b[k] for k in names}).numpy()
        same += int((q.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
        worst = max(worst, float(np.abs(q - ref).max()))
    regressor = int(getattr(model.config, "num_labels", 2)) == 1  # one output: no class to agree on
    return {"same_prediction": same / total if total and not regressor else None, "n": total, "max_abs_diff": worst}
