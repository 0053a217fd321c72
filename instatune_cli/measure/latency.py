"""Inference latency of an ONNX graph with onnxruntime on the CPU.

One code path for the export stage's report and the search's `latency` objective: build one session per
model (`LatencyProbe` or `export.ort_session`) and time it at any (batch, sequence) with few runs. Inputs
are random token ids below the vocabulary size recorded in the graph's metadata by `export_onnx` (or given
explicitly), an all-ones attention mask and zero token types. The result records the thread count that was
actually configured, so numbers from different machines or settings are never silently compared.

`clock="cpu"` (one intra-op thread only) times each run with the calling thread's CPU time: with one thread
ORT runs the whole graph in the calling thread, so this is the compute the model costs, unaffected by other
processes taking the CPU. On a busy machine it ranks models far more stably than the wall clock (measured
here: MiniLM b1 s128 35.4-36.0 ms over 10 runs at load average 4 on 2 cores, while 2-thread wall times
ranged 16-70 ms).

Sessions come from `export.ort_session`, which switches off ORT's session-time SkipLayerNormFusion (slower on
ORT's CPU kernel than the Add + LayerNormalization it replaces: see the `instatune_cli.export` docstring);
`disabled_optimizers=()` measures a graph the way a default ORT session would.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError
from instatune_cli.onnxrt import SLOW_CPU_OPTIMIZERS, ort_session, read_metadata

DEFAULT_WARMUP = 3
DEFAULT_RUNS = 20
#: token ids stay below this when neither the caller nor the graph says the vocabulary size
SAFE_VOCAB = 100


@dataclass(frozen=True)
class LatencyOptions:
    """How a latency figure is measured: the one definition of the latency options of `export` and `quantize`
    (`--batch`, `--seq-len`, `--threads`, `--runs`) and of the search's latency objective (`--latency-batch`,
    ...), whose options dataclasses take their defaults from here. `seq_len` None: the stage's own (128, or the
    model's maximum when shorter; the search space's seq_len); `threads` None: `default_threads()`."""

    batch: int = 1
    seq_len: int | None = None
    threads: int | None = None
    runs: int = DEFAULT_RUNS


def default_threads() -> int:
    """The one default thread count of every latency figure: `OMP_NUM_THREADS` when it is set to a positive
    number (the user's word for how many threads a process may use), else the CPUs this process may run on
    (the affinity mask, not the machine's count)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


class LatencyProbe:
    """One ORT session for one graph; `measure(batch, seq_len)` as often as needed."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None,
                 vocab_size: int | None = None, disabled_optimizers: Sequence[str] | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise InstatuneError(f"ONNX model {self.onnx_path} does not exist; export one first")
        self.threads = int(threads) if threads else default_threads()
        self.disabled_optimizers = list(SLOW_CPU_OPTIMIZERS if disabled_optimizers is None else disabled_optimizers)
        self.session = ort_session(self.onnx_path, self.threads, self.disabled_optimizers)
        meta = read_metadata(self.onnx_path)
        self.vocab_size = int(vocab_size or meta.get("vocab_size") or SAFE_VOCAB)
        self.max_seq_len = int(meta["max_sequence_length"]) if "max_sequence_length" in meta else None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.float_inputs = {i.name for i in self.session.get_inputs() if "float" in i.type}
        # image graphs: the fixed (channels, height, width) the model was exported at; seq_len is ignored
        self.input_shape = tuple(int(d) for d in meta["input_shape"].split(",")) if meta.get("input_shape") else None
        self.provider = self.session.get_providers()[0]

    def feeds(self, batch: int, seq_len: int, seed: int = 0) -> dict[str, Any]:
        import numpy as np

        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {}
        for name in self.inputs:
            if name in self.float_inputs:
                if self.input_shape is None:
                    raise InstatuneError(f"{self.onnx_path} takes {name} but records no input_shape; re-export it")
                out[name] = rng.standard_normal((batch, *self.input_shape), dtype=np.float32)
            elif name == "input_ids":
                out[name] = rng.integers(0, self.vocab_size, size=(batch, seq_len), dtype=np.int64)
            elif name == "attention_mask":
                out[name] = np.ones((batch, seq_len), dtype=np.int64)
            else:  # token_type_ids and anything id-like: zeros are always valid
                out[name] = np.zeros((batch, seq_len), dtype=np.int64)
        return out

    def measure(self, batch: int, seq_len: int, warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS,
                seed: int = 0, clock: str = "wall") -> dict[str, Any]:
        if clock not in ("wall", "cpu"):
            raise InstatuneError(f"unknown latency clock {clock!r}; use wall or cpu")
        if clock == "cpu" and self.threads != 1:
            raise InstatuneError(f"the cpu clock needs one ORT thread (this probe has {self.threads})")
        if batch < 1 or seq_len < 1 or runs < 1 or warmup < 0:
            raise InstatuneError(f"latency needs batch, seq_len, runs >= 1 and warmup >= 0 "
                                 f"(got {batch}, {seq_len}, {runs}, {warmup})")
        if self.max_seq_len is not None and seq_len > self.max_seq_len:
            raise InstatuneError(f"sequence length {seq_len} exceeds the model's maximum {self.max_seq_len}; "
                                 "measure at a shorter sequence length")
        feeds = self.feeds(batch, seq_len, seed)
        run = self.session.run
        timer = time.thread_time if clock == "cpu" else time.perf_counter
        for _ in range(warmup):
            run(None, feeds)
        times = []
        for _ in range(runs):
            t0 = timer()
            run(None, feeds)
            times.append((timer() - t0) * 1e3)
        s = sorted(times)
        return {
            "median_ms": statistics.median(s),
            "p90_ms": _percentile(s, 0.9),
            "mean_ms": statistics.fmean(s),
            "min_ms": s[0],
            "runs": runs,
            "warmup": warmup,
            "threads": self.threads,
            "clock": clock,
            "disabled_optimizers": self.disabled_optimizers,
            "batch": batch,
            "seq_len": seq_len,
            "provider": self.provider,
        }


def measure_ort_latency(onnx_path: str | Path, batch: int, seq_len: int, threads: int | None = None,
                        warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS,
                        vocab_size: int | None = None, clock: str = "wall") -> dict[str, Any]:
    """Median / p90 ms per forward of `onnx_path` at (batch, seq_len) with `threads` intra-op threads.

    `threads=None` uses `default_threads()` ($OMP_NUM_THREADS, else every CPU this process may run on; recorded
    in the result). For many shapes of one
    model, keep a `LatencyProbe` instead (one session). `clock="cpu"` needs `threads=1` (see module doc).
    """
    return LatencyProbe(onnx_path, threads, vocab_size).measure(batch, seq_len, warmup, runs, clock=clock)
