"""measure.latency: ORT latency of an exported graph (the search's latency objective uses the same probe)."""

from __future__ import annotations

import pytest
from helpers import tiny_model

from instatune_cli.errors import InstatuneError
from instatune_cli.export import export_onnx
from instatune_cli.extract import save_extracted
from instatune_cli.measure.latency import LatencyProbe, measure_ort_latency
from instatune_cli.measure.size import onnx_bytes, weights_bytes
from instatune_cli.space import SubNet


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("lat")
    save_extracted(tiny_model("bert"), SubNet((2, 4), (10, 37)), None, d)
    export_onnx(d, d / "model.onnx", exporter="torchscript")  # the probe does not care which exporter
    return d / "model.onnx"


def test_latency_dict_is_sane(onnx_path):
    r = measure_ort_latency(onnx_path, batch=2, seq_len=16, threads=1, warmup=1, runs=5)
    assert set(r) >= {"median_ms", "p90_ms", "runs", "threads", "batch", "seq_len", "provider"}
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert r["median_ms"] < 1000
    assert (r["runs"], r["threads"], r["batch"], r["seq_len"]) == (5, 1, 2, 16)
    assert r["provider"] == "CPUExecutionProvider"


def test_probe_keeps_one_session_for_many_shapes(onnx_path):
    probe = LatencyProbe(onnx_path)
    assert probe.vocab_size == 100 and probe.max_seq_len == 64  # read from the graph's metadata
    assert probe.threads >= 1
    session = probe.session
    a = probe.measure(1, 8, warmup=0, runs=2)
    b = probe.measure(3, 64, warmup=0, runs=2)
    assert probe.session is session and a["seq_len"] == 8 and b["batch"] == 3
    feeds = probe.feeds(2, 5)
    assert feeds["input_ids"].max() < 100 and feeds["attention_mask"].all()


def test_cpu_clock_needs_one_thread(onnx_path):
    r = measure_ort_latency(onnx_path, 2, 16, threads=1, warmup=1, runs=3, clock="cpu")
    assert r["clock"] == "cpu" and r["threads"] == 1 and 0 < r["median_ms"] < 1000
    with pytest.raises(InstatuneError, match="needs one ORT thread"):
        measure_ort_latency(onnx_path, 2, 16, threads=2, runs=1, clock="cpu")


def test_latency_user_errors(onnx_path, tmp_path):
    with pytest.raises(InstatuneError, match="exceeds the model's maximum 64"):
        measure_ort_latency(onnx_path, 1, 65, runs=1)
    with pytest.raises(InstatuneError, match="runs >= 1"):
        measure_ort_latency(onnx_path, 1, 8, runs=0)
    with pytest.raises(InstatuneError, match="does not exist"):
        measure_ort_latency(tmp_path / "missing.onnx", 1, 8)


def test_sizes(onnx_path):
    d = onnx_path.parent
    assert weights_bytes(d) == (d / "model.safetensors").stat().st_size
    assert onnx_bytes(onnx_path) == onnx_path.stat().st_size  # small graph: no external data
