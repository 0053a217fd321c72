"""Recovery fine-tuning: `instatune tune EXTRACT_DIR` on tiny extracts (per-layer and stock), then search, extract
and export of the recovered run; damaged extracts and foreign teachers refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    assert_cli_error,
    make_tiny_bert,
    make_tiny_data,
    one_thread,
    run_cli,
    tiny_tune_args,
    tiny_tune_config,
)
from helpers import load_without_instatune, logits, max_diff

from instatune_cli import artifacts
from instatune_cli.space import SubNet

pytestmark = pytest.mark.usefixtures("single_thread")

PER_LAYER = "L3-h4.2.3-f25.12.37"  # in the tiny run's derived space (heads {2,3,4}, FFN {12,25,37}); spread: 0, 1, 3
STOCK = "L3-h4-f25"


def _tune_args(model: Path, out: Path, *extra: str) -> list[str]:
    """tiny_tune_args without --data: a recovery run takes its data from the extract's parent run."""
    args = tiny_tune_args(model, "unused", out, *extra)
    i = args.index("--data")
    return args[:i] + args[i + 2:]


@pytest.fixture(scope="module")
def extracts(tiny_tune_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("extracts")
    out = {}
    with one_thread():
        for name, cfg in (("per_layer", PER_LAYER), ("stock", STOCK)):
            r = run_cli("extract", tiny_tune_run, "--config", cfg, "-o", d / name)
            assert r.exit_code == 0, r.output
            out[name] = d / name
    assert artifacts.load(out["per_layer"], "extract").metrics["kind"] == "instatune"
    assert artifacts.load(out["stock"], "extract").metrics["kind"] == "stock"
    return out


@pytest.fixture(scope="module")
def recovered(extracts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """--plain recovery of the per-layer extract, another seed than the parent's, data from the parent run."""
    out = tmp_path_factory.mktemp("recovered") / "run"
    with one_thread():
        r = run_cli(*_tune_args(extracts["per_layer"], out, "--plain", "--seed", "3", "--max-steps", "8"))
    assert r.exit_code == 0, r.output
    return out


def test_per_layer_extract_recovers_with_the_parents_data_and_split(recovered, extracts, tiny_tune_run):
    art = artifacts.load(recovered, "tune")
    parent = artifacts.load(tiny_tune_run, "tune")
    ext = artifacts.load(extracts["per_layer"], "extract")
    src = art.model["source_extract"]
    assert src["path"] == str(extracts["per_layer"].resolve()) and src["digest"] == ext.digest
    assert src["kind"] == "instatune" and src["subnet_name"] == PER_LAYER and src["kept_layers"] == [0, 1, 3]
    assert [p["stage"] for p in src["parents"]] == ["tune"] and src["parents"][0]["digest"] == parent.digest
    assert src["data_from_parent"] and src["val_seed"] == 7 and src["teacher"] is None
    assert art.options["data"] == parent.options["data"] and art.options["val_split"] == "16"
    assert art.options["seed"] == 3  # training order is this run's; the split is the parent's
    assert (recovered / "val.jsonl").read_text() == (tiny_tune_run / "val.jsonl").read_text()
    assert art.model["elastic"] is False and art.model["labels"] == parent.model["labels"]
    assert art.model["family"] == "bert" and art.model["model_type"] == "instatune_bert"
    # a plain run sorts heads and neurons after training (for its search's cuts): per layer, each its own count
    assert [len(h) for h in art.model["reorder"]["head_orders"]] == [4, 2, 3]
    # the per-layer model is kept whole, in the extract's layout, tokenizer beside it
    cfg = json.loads((recovered / "model" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["instatune_model_type"] == "instatune_bert"
    assert cfg["layer_heads"] == [4, 2, 3] and cfg["layer_ffn"] == [25, 12, 37]
    assert (recovered / "model" / "modeling_instatune_bert.py").is_file()
    assert (recovered / "model" / "tokenizer.json").is_file()
    space = json.loads((recovered / "space.json").read_text())
    assert space["layers"] == [3] and space["heads"] == [[2, 3, 4], [2], [2, 3]]
    assert space["ffn"] == [[12, 25], [12], [12, 25, 37]]  # the widest layer's thirds, up to each layer's
    # it trained: the weights moved away from the extract's
    from safetensors.torch import load_file

    a, b = load_file(str(recovered / "model" / "model.safetensors")), load_file(str(extracts["per_layer"] /
                                                                                    "model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


def test_recovered_model_reloads_with_identical_outputs(recovered):
    from instatune_cli.extract import load_extracted
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.tune import load_eval_batches, load_tuned

    model, tok, space, art = load_tuned(recovered)
    assert type(model).__name__ == "InstatuneBertForSequenceClassification"
    batches = load_eval_batches(art, tok, batch_size=16)
    plain = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    direct = load_extracted(recovered / "model")
    assert max_diff(logits(model, plain), logits(direct, plain)) < 1e-6
    stock = load_without_instatune(recovered / "model", plain[:1])  # trust_remote_code, no instatune
    assert stock["model"] == "InstatuneBertForSequenceClassification"
    assert max_diff(stock["logits"], logits(model, plain[:1])) < 1e-5
    ev = Evaluator(model, batches)
    assert ev.accuracy(None) == pytest.approx(art.metrics["super_accuracy"], abs=1e-9)


def test_recovered_run_searches_extracts_and_exports(recovered, tmp_path):
    from instatune_cli.extract import load_extracted

    r = run_cli("search", recovered, "--objectives", "acc,macs", "--evals", "6", "--population", "3",
                "--algorithm", "random", "-o", tmp_path / "search")
    assert r.exit_code == 0, r.output
    front = json.loads((tmp_path / "search" / "front.json").read_text())
    src = artifacts.load(recovered, "tune").model["source_extract"]
    full = SubNet.parse_name(PER_LAYER)
    assert front["reference"]["subnet_name"] == PER_LAYER and front["reference"]["macs"] == src["macs"]
    space = json.loads((recovered / "space.json").read_text())
    for row in front["front"]:  # every member is a cut of the per-layer model, within each layer's width
        sub = SubNet.from_dict(row)
        assert sub.layers == 3 and all(h <= m for h, m in zip(sub.heads, full.heads, strict=True))
        assert all(f <= m for f, m in zip(sub.ffn, full.ffn, strict=True))
    assert len(space["heads"]) == 3

    # the full network extracts back to a per-layer directory equal to the recovered model
    r = run_cli("extract", recovered, "--config", PER_LAYER, "-o", tmp_path / "full")
    assert r.exit_code == 0, r.output
    ext = artifacts.load(tmp_path / "full", "extract")
    assert ext.metrics["kind"] == "instatune" and ext.metrics["params_match"]
    assert ext.metrics["macs"] == ext.metrics["macs_supernet"] == src["macs"]
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["layer_heads"] == [4, 2, 3]
    batches = [{"input_ids": torch.tensor([[2, 7, 9, 11, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
                "token_type_ids": torch.zeros(1, 5, dtype=torch.long)}]
    assert max_diff(logits(load_extracted(tmp_path / "full"), batches),
                    logits(load_extracted(recovered / "model"), batches)) < 1e-5
    assert max_diff(load_without_instatune(tmp_path / "full", batches)["logits"],
                    logits(load_extracted(recovered / "model"), batches)) < 1e-5

    # a cut of it: per layer again (layer 1 has 2 of the 4 heads, so no cut of this model is a stock BERT)
    r = run_cli("extract", recovered, "--config", "L3-h2-f12", "-o", tmp_path / "cut")
    assert r.exit_code == 0, r.output
    assert artifacts.load(tmp_path / "cut", "extract").metrics["kind"] == "instatune"
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["layer_ffn"] == [12, 12, 12]

    # a front member through export (ONNX parity)
    r = run_cli("export", tmp_path / "search", "--subnet", "1", "--runs", "2", "-o", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    man = artifacts.load(tmp_path / "onnx", "export")
    assert man.metrics["parity"]["max_abs_diff"] <= 1e-4 and man.model["source_extract"]["digest"] == src["digest"]

    # a search's extract recovers too: the chain extract -> search -> tune, the run behind it as teacher
    r = run_cli("extract", tmp_path / "search", "--subnet", "1", "-o", tmp_path / "sub1")
    assert r.exit_code == 0, r.output
    r = run_cli(*_tune_args(tmp_path / "sub1", tmp_path / "again", "--plain", "--teacher", "parent",
                            "--max-steps", "2"))
    assert r.exit_code == 0, r.output
    again = artifacts.load(tmp_path / "again", "tune")
    chain = again.model["source_extract"]["parents"]
    assert [c["stage"] for c in chain] == ["search", "tune"] and chain[1]["path"] == str(recovered.resolve())
    assert again.options["teacher"] == str(recovered.resolve()) and again.options["data"] == src_data(recovered)


def test_stock_extract_recovers_with_the_parent_as_teacher(extracts, tiny_tune_run, tmp_path):
    out = tmp_path / "rec"
    r = run_cli(*_tune_args(extracts["stock"], out, "--plain", "--teacher", "parent", "--max-steps", "4"))
    assert r.exit_code == 0, r.output
    art = artifacts.load(out, "tune")
    assert art.options["teacher"] == str(tiny_tune_run.resolve())
    assert art.manifest["training"]["teacher_cache"] == "teacher_logits.safetensors"
    src = art.model["source_extract"]
    assert src["teacher"] == "parent" and src["kind"] == "stock"
    from transformers import AutoModelForSequenceClassification

    stock = AutoModelForSequenceClassification.from_pretrained(out / "model")  # a stock BERT, no remote code
    assert type(stock).__name__ == "BertForSequenceClassification" and stock.config.num_hidden_layers == 3
    # the teacher's logits are the parent super-network's (its full network), over the training set
    from safetensors.torch import load_file

    t = load_file(str(out / "teacher_logits.safetensors"))["logits"]
    assert t.shape[1] == 2 and t.shape[0] == art.metrics["train_examples"]
    # its full network extracts to a stock BERT again
    r = run_cli("extract", out, "--config", STOCK, "-o", tmp_path / "full")
    assert r.exit_code == 0, r.output
    assert artifacts.load(tmp_path / "full", "extract").metrics["kind"] == "stock"
    assert "auto_map" not in json.loads((tmp_path / "full" / "config.json").read_text())
    # naming the parent run by its path records the same
    args = _tune_args(extracts["stock"], tmp_path / "rec2", "--plain", "--teacher", str(tiny_tune_run), "--max-steps",
                      "2")
    r = run_cli(*[a for a in args if a != "--quiet"])
    assert r.exit_code == 0, r.output
    rec2 = artifacts.load(tmp_path / "rec2", "tune")
    assert rec2.model["source_extract"]["teacher"] == "parent" and rec2.model["family"] == "bert"
    assert f"next: instatune export {tmp_path / 'rec2'} --config {STOCK}" in " ".join(r.output.split())


def test_elastic_run_on_a_per_layer_extract_trains_its_own_space(extracts, tmp_path):
    out = tmp_path / "el"
    r = run_cli(*_tune_args(extracts["per_layer"], out, "--max-steps", "3"))
    assert r.exit_code == 0, r.output
    art = artifacts.load(out, "tune")
    assert art.model["elastic"] and art.manifest["space"]["layers"] == [3]
    assert art.metrics["smallest_subnet"] == "L3-h2-f12"
    r = run_cli(*_tune_args(extracts["per_layer"], tmp_path / "bad", "--space", "bert-base-paper"))
    assert_cli_error(r, "per-layer sub-network of 3 layers", "[3]")


def src_data(run: Path) -> str:
    return artifacts.load(run, "tune").options["data"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, fragment", [
    ("edit", "does not match its manifest digest"),
    ("remove", "modeling_instatune_bert.py is missing"),
    ("weights", "does not match its manifest digest"),
])
def test_damaged_extract_is_refused_in_one_line(extracts, tmp_path, damage, fragment):
    ext = _copy(extracts["per_layer"], tmp_path / "ext")
    f = ext / "modeling_instatune_bert.py"
    if damage == "edit":
        f.write_text(f.read_text() + "\nimport os  # injected\n")
    elif damage == "remove":
        f.unlink()
    else:
        w = ext / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 0xFF
        w.write_bytes(bytes(data))
    r = run_cli(*_tune_args(ext, tmp_path / "out", "--plain"))
    line = assert_cli_error(r, fragment, "re-run extract")
    assert "modeling_instatune_bert.py" in line or damage == "weights"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_per_layer_copy_without_its_manifest_is_refused(extracts, tiny_data_dir, tmp_path):
    ext = _copy(extracts["per_layer"], tmp_path / "ext")
    (ext / "manifest.json").unlink()
    r = run_cli(*_tune_args(ext, tmp_path / "out", "--plain", "--data", str(tiny_data_dir)))
    assert_cli_error(r, "per-layer instatune model", "no manifest.json")


def test_teacher_with_another_label_set_is_refused(extracts, tiny_bert_dir, tmp_path):
    teacher = make_tiny_bert(tmp_path / "teacher3", head=True, num_labels=3)
    r = run_cli(*_tune_args(extracts["stock"], tmp_path / "out", "--plain", "--teacher", str(teacher)))
    assert_cli_error(r, "teacher", "3 classes", "2")
    # an extract of a task with named classes, a teacher with other names
    from instatune_cli.tune.loop import run_tune

    data = make_tiny_data(tmp_path / "named-data", labels=("bad", "good"))
    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, data, tmp_path / "named-run", max_steps=2))
    r = run_cli("extract", tmp_path / "named-run", "--config", STOCK, "-o", tmp_path / "named-ext")
    assert r.exit_code == 0, r.output
    named = make_tiny_bert(tmp_path / "teacher-named", head=True, id2label={0: "neg", 1: "pos"},
                           label2id={"neg": 0, "pos": 1})
    r = run_cli(*_tune_args(tmp_path / "named-ext", tmp_path / "out", "--plain", "--teacher", str(named)))
    assert_cli_error(r, "teacher", "['neg', 'pos']", "['bad', 'good']")
    assert not (tmp_path / "out").exists()


def test_data_with_other_labels_and_teacher_parent_without_extract_are_refused(extracts, tiny_bert_dir, tmp_path):
    data = make_tiny_data(tmp_path / "named-data", labels=("bad", "good"))
    r = run_cli(*_tune_args(extracts["per_layer"], tmp_path / "out", "--plain", "--data", str(data)))
    assert_cli_error(r, "keeps the extract's classifier")
    r = run_cli(*_tune_args(tiny_bert_dir, tmp_path / "out", "--plain", "--teacher", "parent", "--data", str(data)))
    assert_cli_error(r, "--teacher parent", "not an extract")


@pytest.mark.integration
def test_minilm_per_layer_extract_recovers(minilm_sst2_run: tuple[Path, Any], tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2: an elastic run on an SST-2 subset (conftest.MINILM_SST2, shared with the
    integration test of tune), a per-layer extract of it, recovery with the parent as teacher; the recovered model
    reloads with the same outputs and beats the extract it started from."""
    from instatune_cli.adapters import adapter_of
    from instatune_cli.deliver import extract_stage
    from instatune_cli.extract import load_extracted
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.tune import load_eval_batches, load_tuned
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    parent = minilm_sst2_run[0]
    base = dict(limit_eval=200, max_length=64, batch_size=16, lr=2e-4, save_every=0, reorder_batches=2, quiet=True,
                seed=42)
    with one_thread():
        extract_stage(parent, tmp_path / "ext", config="L4-h12.6.8.6-f1536.512.1024.512")
        run_tune(TuneConfig(model=str(tmp_path / "ext"), plain=True, teacher="parent", max_steps=40,
                            output=str(tmp_path / "rec"), **base))
        art = artifacts.load(tmp_path / "rec", "tune")
        assert art.options["task"] == "sst2" and art.options["limit_train"] == 960  # the parent's data
        model, tok, _, _ = load_tuned(tmp_path / "rec")
        batches = load_eval_batches(art, tok, batch_size=32)
        after = Evaluator(model, batches).accuracy(None)
        ext = load_extracted(tmp_path / "ext")
        adapter_of(ext).make_elastic(ext)  # what the Evaluator scores with (its full network here)
        before = Evaluator(ext, batches).accuracy(None)
        plain = [{k: v for k, v in b.items() if k != "labels"} for b in batches[:2]]
        assert max_diff(logits(model, plain), logits(load_extracted(tmp_path / "rec" / "model"), plain)) < 1e-5
    print(f"extract {before:.4f} -> recovered {after:.4f} on {len(batches)} batches")
    assert after == pytest.approx(art.metrics["super_accuracy"], abs=1e-9)
    # measured: the extract 0.7050, recovered 0.7350 (200 dev sentences; 40 steps, teacher the parent run)
    assert after >= before and after > 0.65, (before, after)


def test_recovery_resumes_and_works_without_its_parent(extracts, tiny_tune_run, tiny_data_dir, tmp_path):
    from conftest import Killed, kill_at

    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    def cfg(out: Path, **kw) -> TuneConfig:
        return TuneConfig(model=str(extracts["stock"]), plain=True, output=str(out), batch_size=8, max_steps=6,
                          lr=3e-3, save_every=2, quiet=True, seed=5, **kw)

    run_tune(cfg(tmp_path / "whole"))
    with pytest.raises(Killed):
        run_tune(cfg(tmp_path / "killed"), on_step=kill_at(4))
    res = run_tune(cfg(tmp_path / "killed", resume=True))
    assert res.resumed_from == 4
    a = (tmp_path / "whole" / "model" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "killed" / "model" / "model.safetensors").read_bytes()

    # the extract moved away from its parent: with --data it still fine-tunes (and says why it has no parent)
    moved = _copy(extracts["stock"], tmp_path / "elsewhere" / "ext")
    run_tune(TuneConfig(model=str(moved), plain=True, data=str(tiny_data_dir), output=str(tmp_path / "lone"),
                        batch_size=8, max_steps=2, save_every=0, quiet=True))
    src = artifacts.load(tmp_path / "lone", "tune").model["source_extract"]
    assert src["parents"] == [] and "parent" in src["parent_note"] and src["val_seed"] is None
    r = run_cli(*_tune_args(moved, tmp_path / "nodata", "--plain"))
    assert_cli_error(r, "no data", "--task or --data")


def test_recovering_several_cuts_pays_the_teacher_pass_once(extracts, tmp_path, monkeypatch):
    """The shared teacher-logits cache: a second cut of the same parent, recovered with the parent as teacher,
    reuses the first one's logits (same key: the parent's weights and the same training rows); turned off, or
    unwritable, each run builds its own and nothing fails."""
    from safetensors.torch import load_file

    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    def recover(name: str, out: str) -> Any:
        return run_tune(TuneConfig(model=str(extracts[name]), plain=True, teacher="parent", output=str(tmp_path / out),
                                   batch_size=8, max_steps=2, save_every=0, quiet=True))

    monkeypatch.setenv("INSTATUNE_CACHE", str(tmp_path / "cache"))
    with one_thread():
        first, second = recover("stock", "a"), recover("per_layer", "b")
    assert (first.teacher_cache, second.teacher_cache) == ("built", "reused")
    shared = list((tmp_path / "cache" / "teacher-logits").glob("*-cpu.safetensors"))
    assert len(shared) == 1 and not list(shared[0].parent.glob("*.tmp"))
    a, b = (load_file(str(tmp_path / d / "teacher_logits.safetensors"))["logits"] for d in ("a", "b"))
    assert torch.equal(a, b)  # the second run keeps its own copy too (a resume never needs the shared one)
    monkeypatch.setenv("INSTATUNE_CACHE", "off")
    with one_thread():
        assert recover("per_layer", "c").teacher_cache == "built"
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("INSTATUNE_CACHE", str(tmp_path / "blocked"))
    with one_thread():
        assert recover("per_layer", "d").teacher_cache == "built"


def test_max_length_comes_from_the_parent_run_unless_given(tiny_bert_dir, tiny_data_dir, tmp_path, capsys):
    """The extract learned on inputs truncated at its parent's --max-length: a recovery run takes it, with or
    without --data; a value given is used, and noted in one line where it truncates otherwise."""
    from instatune_cli.tune.loop import run_tune

    run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "run", max_length=12, max_steps=2))
    r = run_cli("extract", tmp_path / "run", "--config", STOCK, "-o", tmp_path / "ext")
    assert r.exit_code == 0, r.output
    capsys.readouterr()

    def recover(name: str, data: str | None = None, **kw) -> tuple[artifacts.Artifact, list[str]]:
        cfg = tiny_tune_config(tmp_path / "ext", "", tmp_path / name, plain=True, max_steps=2, **kw)
        cfg.data = data  # none given: the parent run's
        run_tune(cfg)
        return artifacts.load(tmp_path / name, "tune"), [ln for ln in capsys.readouterr().err.splitlines()
                                                        if ln.startswith("notice:")]

    art, notes = recover("inherit")
    assert art.options["max_length"] == 12 and art.model["max_length"] == 12 and not notes
    assert art.model["source_extract"]["max_length_from_parent"] is True
    art, notes = recover("with-data", data=str(tiny_data_dir))  # data given: the encoding is still the parent's
    assert art.model["max_length"] == 12 and not notes
    art, notes = recover("same", max_length=12)
    assert art.model["max_length"] == 12 and not art.model["source_extract"]["max_length_from_parent"] and not notes
    art, notes = recover("other", max_length=20)
    assert art.model["max_length"] == 20 and len(notes) == 1
    assert "--max-length 20" in notes[0] and "truncated at 12" in notes[0] and str(tmp_path / "run") in notes[0]
    # the tokenizer the extract carries (its parent's, saved again) is no note; another one is
    art, notes = recover("tok", tokenizer=str(tiny_bert_dir))
    assert not notes and art.options["tokenizer"] == str(tiny_bert_dir)
    other = shutil.copytree(tiny_bert_dir, tmp_path / "cased")
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["normalizer"] = None  # a cased tokenizer: other ids for the same text
    (other / "tokenizer.json").write_text(json.dumps(spec))
    art, notes = recover("other-tok", tokenizer=str(other))
    assert len(notes) == 1 and f"--tokenizer {other} replaces the tokenizer" in notes[0]
    # a run of a model that is not an extract keeps the default
    run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "plain", plain=True, max_steps=1))
    assert artifacts.load(tmp_path / "plain", "tune").options["max_length"] == 128


def test_a_run_waits_for_another_building_the_same_teacher_logits(tmp_path, monkeypatch):
    """Two runs needing the same teacher logits at once (a bench's recovery runs of several cuts): while one
    holds the build lock beside the shared copy, the other says it waits, then reads that copy instead of paying
    the teacher pass again (`built` False, the holder's logits exactly)."""
    import fcntl
    import os
    import threading

    from instatune_cli.tune import teacher as T

    monkeypatch.setenv("INSTATUNE_CACHE", str(tmp_path / "cache"))
    key, n = "k" * 16, 5
    shared = T.shared_cache_file(key, torch.device("cpu"))
    shared.parent.mkdir(parents=True)
    fd = os.open(shared.with_name(shared.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run is building
    waiting, got = threading.Event(), {}
    (tmp_path / "run").mkdir()

    def second() -> None:  # a teacher that does not exist: only a build would touch it
        got["out"] = T.teacher_logits(tmp_path / "run", str(tmp_path / "no-teacher"), list(range(n)), key,
                                      on_wait=waiting.set)

    th = threading.Thread(target=second)
    th.start()
    try:
        assert waiting.wait(60), "the second run did not wait for the lock"
        assert th.is_alive()
        built = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
        T._write_cache(shared, built, key, n, "the first run's teacher")
    finally:
        os.close(fd)  # the first run is done
        th.join(60)
    out, was_built = got["out"]
    assert not was_built and torch.equal(out, built)
    assert (tmp_path / "run" / T.CACHE_FILE).is_file()  # its own copy, for --resume


def _wait_for_lock_on_two_ranks(rank: int, port: int, shared: str, out: str) -> None:
    """One rank of a launched run that needs logits another run is building (spawned by the test below)."""
    from datetime import timedelta

    import torch.distributed as dist

    from instatune_cli.distributed import Group
    from instatune_cli.tune import teacher as T

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=5))
    try:
        waits = []
        Group(rank=rank, world=2).agree(lambda: Path(out, "ready").write_text("both ranks are up"))
        with T._one_builder(Path(shared), Group(rank=rank, world=2), lambda: waits.append(1)):
            Path(out, f"rank{rank}").write_text(str(len(waits)))
    finally:
        dist.destroy_process_group()


def test_a_launched_run_waits_for_the_lock_without_stalling_its_other_ranks(tmp_path):
    """Under a launcher, rank 0 alone takes the build lock; while another run holds it, the other ranks must not
    sit in one collective the whole time (gloo's timeout, 5 s here, would fail them after a long teacher pass):
    rank 0 asks every couple of seconds and each answer is a short collective. The lock is held 9 s after both
    ranks are up, nearly twice the timeout; both ranks then enter the block, and only rank 0 said that it waits."""
    import fcntl
    import os
    import socket
    import time

    import torch.multiprocessing as mp

    shared = tmp_path / "cache" / "logits.safetensors"
    shared.parent.mkdir()
    fd = os.open(shared.with_name(shared.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run is building
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_wait_for_lock_on_two_ranks, args=(port, str(shared), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:  # spawning takes a while
            time.sleep(0.1)
        time.sleep(9)
        assert not (tmp_path / "rank0").exists() and not (tmp_path / "rank1").exists()
    finally:
        os.close(fd)  # the other run is done
    while not ctx.join(60):
        pass
    assert (tmp_path / "rank0").read_text() == "1" and (tmp_path / "rank1").read_text() == "0"
