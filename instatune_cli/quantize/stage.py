"""The `quantize` stage: an extracted sub-network -> an INT8 model under a per-layer policy, with accuracy,
size and latency before and after (docs/architecture.md, "Quantization").

Input: an extract directory, or a search directory with `--subnet N` (extract is chained, as `export` does).
Policy: `--policy FILE`, `--all-int8`, or, for a sub-network of a joint search (`search --quant`), the policy
the search chose for it. Calibration: the tune run's `calib.jsonl` (training examples), never the split
accuracy is reported on. Writes `model.int8.onnx` (engine `ort`) or Neural Compressor's `inc/` files
(engine `inc`), `policy.json`, the tokenizer and the manifest.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from instatune_cli import artifacts
from instatune_cli.deliver import chained_extract, tune_of
from instatune_cli.errors import InstatuneError
from instatune_cli.export import export_onnx, ort_feed, ort_session
from instatune_cli.measure.latency import LatencyOptions, measure_ort_latency
from instatune_cli.measure.metrics import eval_score as eval_score
from instatune_cli.measure.size import onnx_bytes, weights_bytes
from instatune_cli.quantize import inc_engine, ort_engine
from instatune_cli.quantize.inc_engine import available
from instatune_cli.quantize.ort_engine import quantize_onnx
from instatune_cli.quantize.policy import DEFAULT_GROUP_SIZE, QuantPolicy, engine_refusal
from instatune_cli.quantize.targets import architecture_of, onnx_targets, torch_targets
from instatune_cli.quantize.vocab import training_token_ids, trim_vocabulary
from instatune_cli.search.stage import searched_policy as searched_policy
from instatune_cli.tune import has_split, load_eval_batches, run_family, run_metric

ENGINES = ("ort", "inc")
MIN_CALIBRATION = 8


@dataclass
class QuantizeOptions:
    policy: str | None = None
    all_int8: bool = False
    all_int4: bool = False     # INT4 block-wise weights wherever `group_size` divides the layer, INT8 elsewhere
    group_size: int | None = None  # of --all-int4 (a policy file carries its own); default policy.DEFAULT_GROUP_SIZE
    engine: str = "ort"
    calibration_samples: int = 256
    max_drop: float = 1.0  # accuracy points
    batch: int = LatencyOptions.batch  # the latency options: measure.latency.LatencyOptions
    seq_len: int | None = LatencyOptions.seq_len
    threads: int | None = LatencyOptions.threads
    runs: int = LatencyOptions.runs
    subnet: int | None = None
    config: str | None = None
    strict_fp32: bool = False  # ort: FP32 layers read FP32 activations (exact, but unfused and slow)
    compile: bool = False      # inc: time both models under torch.compile (Neural Compressor's deployment)
    trim_vocab: bool = False   # ort: keep only the embedding rows of tokens in the training data

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise InstatuneError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if sum(map(bool, (self.policy, self.all_int8, self.all_int4))) > 1:
            raise InstatuneError("give one of --policy, --all-int8 and --all-int4, not several")
        if self.group_size is not None and not self.all_int4:
            raise InstatuneError("--group-size is for --all-int4; a policy file carries its own group_size")
        if self.calibration_samples < MIN_CALIBRATION:
            raise InstatuneError(f"--calibration-samples {self.calibration_samples} is too few; give at least "
                                 f"{MIN_CALIBRATION} (default 256)")
        if self.trim_vocab and self.engine != "ort":
            raise InstatuneError("--trim-vocab rewrites the ONNX graph; use it with --engine ort")
        if self.compile and self.engine != "inc":
            raise InstatuneError("--compile times the inc engine's PyTorch models; ONNX Runtime needs no compile step")
        if self.engine == "inc":
            why = available()
            if why:
                raise InstatuneError(why)


class QuantizeStage:
    """One run of the stage: resolve inputs first, then quantize, measure and commit."""

    def __init__(self, src: str | Path, output: str | Path | None, opts: QuantizeOptions, force: bool = False,
                 notify: Any = None) -> None:
        opts.check()
        self.opts, self.force = opts, force
        self.say = notify or (lambda _m: None)
        self.src = src
        self.output = output

    # -- inputs ----------------------------------------------------------------------------------
    def resolve(self) -> None:
        given = QuantPolicy.load(self.opts.policy) if self.opts.policy else None  # before anything is written
        art = artifacts.load(self.src, ("extract", "search", "tune"))
        if self.output is not None:  # before a chained extract runs: never over what this stage reads
            artifacts.check_not_input(Path(self.output), artifacts.lineage(art))
        if art.stage != "extract":
            art = chained_extract(art, self.opts.subnet, self.opts.config, self.force, self.say)
        elif self.opts.subnet is not None or self.opts.config is not None:
            raise InstatuneError(f"{art.path} is already an extracted model; drop --subnet/--config")
        self.art, self.tune = art, tune_of(art)
        self.out = Path(self.output) if self.output else art.path.resolve().parent / f"{art.path.resolve().name}-int8"
        self._load_model()
        self.policy = given or self._policy()
        self.policy.check_for(self.arch, f"the model in {art.path}")
        why = engine_refusal(self.policy, self.opts.engine, self._supports())
        if why:
            raise InstatuneError(why)

    def _supports(self) -> dict[str, tuple[str, ...]]:
        return ort_engine.SUPPORTS if self.opts.engine == "ort" else inc_engine.supports(self.policy)

    def _load_model(self) -> None:
        self.fam = run_family(self.tune)
        flag = "--trim-vocab" if self.opts.trim_vocab and not self.fam.vocab_trim else \
            f"--engine {self.opts.engine}" if self.opts.engine not in self.fam.quant_engines else None
        if flag:
            raise InstatuneError(f"{flag} is for the text families; {self.art.path} is a {self.fam.family} model: use "
                                 "the default --engine ort without --trim-vocab")
        self.model = self.fam.load_extracted(self.art.path).float().eval()
        self.tok = self.fam.load_preprocessor(self.art.path)
        self.names = self.fam.input_names(self.model)
        self.arch = architecture_of(self.model)
        self.targets = torch_targets(self.model)

    def _policy(self) -> QuantPolicy:
        if self.opts.policy:
            return QuantPolicy.load(self.opts.policy)
        if self.opts.all_int4:
            pol = QuantPolicy.uniform(self.arch, "int4", group_size=self.opts.group_size or DEFAULT_GROUP_SIZE)
            if self.opts.engine == "inc":  # one route per model there: weight-only INT8 where INT4 does not fit
                pol.layers.update({n: "int8-weights" for n in pol.int8()})
            elif pol.int8():
                self.say(f"--all-int4: group size {pol.group_size} does not divide {', '.join(pol.int8()[:4])}"
                         f"{' ...' if len(pol.int8()) > 4 else ''}: INT8 there")
            return self._engine_default(pol)
        if not self.opts.all_int8:
            found = searched_policy(self.art)
            if found is not None:
                self.say(f"using the policy the joint search chose for this sub-network ({found.summary()})")
                return found
            self.say("no --policy given and no searched policy for this model: quantizing every layer (--all-int8)")
        return self._engine_default(QuantPolicy.uniform(self.arch, "int8"))

    def _engine_default(self, pol: QuantPolicy) -> QuantPolicy:
        """A default policy states what the engine does: layers it has no operator for stay FP32, said once."""
        supports = ort_engine.SUPPORTS if self.opts.engine == "ort" else inc_engine.supports(pol)
        kept = [n for n in pol.quantized()
                if ("embeddings" if n == "embeddings" else "linear") not in supports.get(pol.layers[n], ())]
        for n in kept:
            pol.layers[n] = "fp32"
        if kept:
            self.say(f"the {self.opts.engine} engine has no operator for {', '.join(kept[:4])}"
                     f"{' ...' if len(kept) > 4 else ''}: FP32 there")
        return pol

    def calibration(self) -> list[dict[str, Any]]:
        if not has_split(self.tune, "calib"):
            raise InstatuneError(
                f"tune run {self.tune.path} has no calib.jsonl; re-run tune to get a calibration sample")
        batches = load_eval_batches(self.tune, self.tok, batch_size=16, limit=self.opts.calibration_samples,
                                    which="calib")
        n = sum(len(b["labels"]) for b in batches)
        if n < MIN_CALIBRATION:
            raise InstatuneError(f"the calibration sample of {self.tune.path} has {n} examples; at least "
                                 f"{MIN_CALIBRATION} are needed")
        self.n_calibration = n
        return [{k: v for k, v in b.items() if k != "labels"} for b in batches]

    # -- run -------------------------------------------------------------------------------------
    def run(self) -> artifacts.Artifact:
        self.resolve()
        calib = self.calibration()
        opts = {"source": str(self.src), **asdict(self.opts)}
        with artifacts.StageWriter(self.out, "quantize", opts, parent=self.art, reads=(self.tune,),
                                   force=self.force) as w:
            self.fam.save_preprocessor(self.tok, w.path)
            self.policy.save(w.path / "policy.json")
            with w.scratch(".quant-") as td:  # inside the partial: a kill leaves nothing beside the output
                metrics = (self._ort(w.path, td, calib) if self.opts.engine == "ort"
                           else self._inc(w.path, td, calib))
            metrics.update(self._verdict(metrics))
            model_info = {**self.art.model, "policy": self.policy.summary()}
            return w.commit(model=model_info, metrics=metrics)

    def _ort(self, out: Path, tmp: Path, calib: list[dict[str, Any]]) -> dict[str, Any]:
        fp32 = tmp / "model.onnx"
        export_onnx(self.art.path, fp32, optimize=False)  # unfused: every linear is its own MatMul/Gemm
        q = out / "model.int8.onnx"
        info = quantize_onnx(fp32, q, self.policy, self.targets, calib, strict=self.opts.strict_fp32)
        if self.opts.trim_vocab:
            info["vocabulary"] = self._trim(fp32, q)
            info["bytes_out"] = onnx_bytes(q)
        seq = self._seq_len()

        fused = tmp / "model.fused.onnx"  # the FP32 baseline is the graph `export` ships, fused (issue 22)
        export_onnx(self.art.path, fused)
        lat = {k: {**measure_ort_latency(p, self.opts.batch, seq, self.opts.threads, runs=self.opts.runs),
                   "graph": g}
               for k, p, g in (("fp32", fused, "fused (as export ships it)"), ("int8", q, "quantized"))}
        return {"quantization": info, "policy": self.policy.to_dict(), "calibration_examples": self.n_calibration,
                "size_bytes": {"fp32": info["bytes_in"], "int8": info["bytes_out"]},
                "accuracy": {"fp32": self._score_torch(self.model), "int8": self._score_onnx(q)},
                "latency": lat, "speedup": lat["fp32"]["median_ms"] / lat["int8"]["median_ms"]}

    def _trim(self, fp32: Path, q: Path) -> dict[str, Any]:
        import onnx

        keep, source = training_token_ids(self.tune, self.tok)
        node = onnx_targets(onnx.load(str(fp32), load_external_data=False).graph, self.targets)["embeddings"]
        info = trim_vocabulary(q, node, keep, int(self.tok.unk_token_id))
        self.say(f"kept {info['kept']:,} of {info['of']:,} embedding rows (the tokens of {source})")
        return {**info, "source": source}

    def _inc(self, out: Path, tmp: Path, calib: list[dict[str, Any]]) -> dict[str, Any]:
        """Quantize, save in Neural Compressor's format, read it back with its loader, and measure the reloaded
        model; a route that is not smaller on disk and not faster than FP32 is refused with the numbers."""
        static = inc_engine.route(self.policy) == "static"
        if static:
            gm, info = inc_engine.quantize_torch(self.model, self.policy, self.targets, calib, self.names, tmp)
            files = inc_engine.save(gm, tuple(calib[0][n] for n in self.names), out / "inc")
            del gm
            loaded = inc_engine.load(out / "inc")
        else:
            fresh = self.fam.load_extracted(self.art.path).float().eval()
            qm, info = inc_engine.quantize_weight_only(fresh, self.policy, torch_targets(fresh))
            files = inc_engine.save_weight_only(qm, out / "inc")
            del qm
            loaded = inc_engine.load(out / "inc", self.fam.load_extracted(self.art.path).float().eval())
        seq = self._seq_len()
        batch = self.fam.random_batch(self.model, self.opts.batch, seq)
        size = {"fp32": weights_bytes(self.art.path), "int8": sum(p.stat().st_size for p in (out / "inc").iterdir())}
        how = "compiled" if self.opts.compile else "eager"
        lat = {"fp32": _torch_latency(self.model, batch, self.names, self.opts, seq),
               "int8": _torch_latency(loaded, batch, self.names, self.opts, seq, positional=static)}
        kind = "static INT8" if static else "weight-only RTN"
        if size["int8"] >= size["fp32"] or lat["int8"]["median_ms"] > lat["fp32"]["median_ms"]:
            raise InstatuneError(
                f"the inc engine's {kind} model is not smaller and faster than FP32 here, so it is not written: "
                f"{size['fp32'] / 1e6:.1f} MB -> {size['int8'] / 1e6:.1f} MB, {lat['fp32']['median_ms']:.1f} ms -> "
                f"{lat['int8']['median_ms']:.1f} ms {how} (b{self.opts.batch} s{seq}, {lat['int8']['threads']} "
                f"threads){'' if self.opts.compile else '; Neural Compressor deploys compiled: try --compile'}; "
                "use --engine ort")
        return {"quantization": {**info, "files": [f"inc/{f}" for f in files], "reloaded_with": "neural_compressor"
                                 ".torch.quantization.load"}, "policy": self.policy.to_dict(),
                "calibration_examples": self.n_calibration, "size_bytes": size,
                "accuracy": {"fp32": self._score_torch(self.model),
                             "int8": self._score_torch(loaded, positional=static)},
                "latency": lat, "speedup": lat["fp32"]["median_ms"] / lat["int8"]["median_ms"],
                "latency_note": f"PyTorch {how}, the reloaded artifact"}

    def _seq_len(self) -> int:
        fixed = self.fam.dims_of(self.model).image_tokens  # an image model runs at its own size
        return fixed or self.opts.seq_len or min(128, self.fam.max_sequence_length(self.model.config))

    # -- measuring -------------------------------------------------------------------------------
    def _eval_batches(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_batches"):
            self._batches = load_eval_batches(self.tune, self.tok, batch_size=32, which="eval")
        return self._batches

    def _metric(self) -> str:
        return run_metric(self.tune)

    def _score(self, logits_of: Any) -> dict[str, Any]:
        return eval_score(self._eval_batches(), logits_of, self._metric(), int(self.model.config.num_labels))

    def _score_torch(self, model: Any, positional: bool = False) -> dict[str, Any]:
        import torch

        def logits(b: dict[str, Any]) -> Any:
            with torch.no_grad():
                out = model(*(b[n] for n in self.names)) if positional else self.fam.logits(model, b)
            return out.float().numpy()

        return self._score(logits)

    def _score_onnx(self, path: Path) -> dict[str, Any]:
        sess = ort_session(path)
        return self._score(lambda b: sess.run(["logits"], {n: ort_feed(b[n]) for n in self.names})[0])

    def _verdict(self, m: dict[str, Any]) -> dict[str, Any]:
        drop = 100 * (m["accuracy"]["fp32"]["score"] - m["accuracy"]["int8"]["score"])
        over = drop > self.opts.max_drop
        if over:
            self.say(f"warning: INT8 loses {drop:.2f} points (> --max-drop {self.opts.max_drop:g}); kept, and "
                     "marked in the manifest: try a policy with more FP32 layers (search --quant)")
        return {"accuracy_drop_points": drop, "over_max_drop": over,
                "size_ratio": m["size_bytes"]["fp32"] / m["size_bytes"]["int8"]}


def _torch_latency(model: Any, b: dict[str, Any], names: list[str], opts: QuantizeOptions, seq: int,
                   positional: bool = False) -> dict:
    """Median ms per forward of batch `b` in eager PyTorch (the inc engine's runtime), after two warm-up calls."""
    import statistics

    import torch

    args = [b[n] for n in names]
    times = []
    if opts.compile:
        model = torch.compile(model)
    with torch.no_grad():
        for i in range(opts.runs + 2):
            t0 = time.perf_counter()
            model(*args) if positional else model(**dict(zip(names, args, strict=True)))
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "runs": opts.runs, "batch": opts.batch, "seq_len": seq,
            "threads": torch.get_num_threads(), "runtime": "pytorch compiled" if opts.compile else "pytorch eager"}


@dataclass(frozen=True)
class QuantizeResult(artifacts.StageResult):
    """A committed quantize directory and the figures `instatune quantize` prints (its manifest's; "fp32" and
    "int8" keyed)."""

    engine: str
    policy_summary: str  # `32/33 layers INT8 (FP32: embeddings)`
    accuracy: dict[str, dict[str, Any]]  # the run's metric on the eval split before and after (`eval_score`)
    accuracy_drop_points: float  # points INT8 lost (negative: gained)
    size_bytes: dict[str, int]
    size_ratio: float  # FP32 size over INT8 size (below 1: INT8 is larger)
    latency: dict[str, dict[str, Any]]


def quantize_stage(src: str | Path, output: str | Path | None, opts: QuantizeOptions | None = None, *,
                   force: bool = False, notify: Any = None, **fields: Any) -> QuantizeResult:
    """Quantize the extracted sub-network at `src` (chaining extract for a search or tune directory) into `output`
    (default SOURCE-int8). `notify(text)` hears the choices made; `fields`: QuantizeOptions' fields instead of
    `opts`."""
    opts = artifacts.stage_options(QuantizeOptions, opts, fields)
    made = QuantizeStage(src, output, opts, force=force, notify=notify).run()
    return QuantizeResult.of(made, engine=made.metrics["quantization"]["engine"], policy_summary=made.model["policy"])
