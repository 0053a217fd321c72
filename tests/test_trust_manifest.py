"""Manifests say what they hold (issue 12): the real model family, and one line (never a KeyError) for a damaged
front.json, a manifest of another schema version or a malformed one, or an archive written without genes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_cli_error, run_cli, tiny_tune_config, tiny_vocab

from instatune_cli import artifacts
from instatune_cli.artifacts import sha256_file
from instatune_cli.errors import InstatuneError

pytestmark = pytest.mark.usefixtures("single_thread")


def save_tiny(family: str, path: Path) -> Path:
    """A tiny RoBERTa or ELECTRA encoder with the tiny WordPiece tokenizer (vocabularies match)."""
    import torch
    import transformers as tf

    vocab = tiny_vocab()
    kw = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37)
    if family == "roberta":
        cfg = tf.RobertaConfig(**kw, max_position_embeddings=66, pad_token_id=0, type_vocab_size=1)
        cls = tf.RobertaModel
    else:
        cfg = tf.ElectraConfig(**kw, embedding_size=32, max_position_embeddings=64)
        cls = tf.ElectraModel
    torch.manual_seed(0)
    path.mkdir(parents=True)
    cls(cfg).save_pretrained(str(path))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tf.BertTokenizerFast(vocab_file=str(path / "vocab.txt"), model_max_length=64).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_manifest_records_the_real_family(family: str, tiny_data_dir: Path, tmp_path: Path) -> None:
    from instatune_cli.tune.loop import run_tune

    model = save_tiny(family, tmp_path / family)
    res = run_tune(tiny_tune_config(model, tiny_data_dir, tmp_path / "run", max_steps=2))
    info = res.artifact.model
    assert (info["family"], info["model_type"], info["adapter"]) == (family, family, "bert")


def update_manifest(directory: Path, rel: str) -> None:
    """Re-list `rel` in the manifest, as a search of another version would have written it."""
    m = json.loads((directory / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == rel:
            f.update(bytes=(directory / rel).stat().st_size, sha256=sha256_file(directory / rel))
    (directory / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def searched(tiny_tune_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("search") / "s"
    res = run_cli("search", tiny_tune_run, "--evals", "6", "--population", "4", "--output", out, "--json")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("front", ["{not json", json.dumps({"fronts": []}), json.dumps({"front": [{"id": "x"}]}),
                                   json.dumps([1, 2])])
def test_a_damaged_front_is_one_line(searched: Path, tmp_path: Path, front: str) -> None:
    import shutil

    s = tmp_path / "s"
    shutil.copytree(searched, s)
    (s / "front.json").write_text(front)
    update_manifest(s, "front.json")
    assert_cli_error(run_cli("extract", s, "--subnet", "1", "-o", tmp_path / "x"), "front.json", "re-run")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("version,fragments", [
    (0, ("made by instatune 0.0.1", "re-run the search stage")),
    (99, ("made by instatune 0.0.1", "upgrade instatune")),
    ("1", ("schema_version",)),
])
def test_another_schema_version_is_told_what_to_do(searched: Path, tmp_path: Path, version: object,
                                                   fragments: tuple[str, ...]) -> None:
    import shutil

    s = tmp_path / "s"
    shutil.copytree(searched, s)
    m = json.loads((s / "manifest.json").read_text())
    m.update(schema_version=version, instatune_version="0.0.1")
    (s / "manifest.json").write_text(json.dumps(m))
    line = assert_cli_error(run_cli("extract", s, "--subnet", "1", "-o", tmp_path / "x"), *fragments)
    assert version == 99 or "upgrade" not in line


@pytest.mark.parametrize("field,value", [("files", "all"), ("files", [{"path": "a"}]), ("parent", {}),
                                         ("stage", None), ("model", [])])
def test_a_malformed_manifest_is_one_line(tmp_path: Path, field: str, value: object) -> None:
    with artifacts.StageWriter(tmp_path / "a", "extract", {}) as w:
        (w.path / "x.txt").write_text("x")
        w.commit()
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    m[field] = value
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InstatuneError) as e:
        artifacts.load(tmp_path / "a")
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value)


def test_an_archive_without_genes_resumes(tmp_path: Path) -> None:
    from instatune_cli.search import run_search
    from instatune_cli.space import SearchSpace

    space = SearchSpace.from_dict({"layers": [2, 3], "heads": [2, 4], "ffn": [8, 16]})

    def evaluate(sub):  # noqa: ANN001, ANN202 - the run_search interface
        return {"acc": sum(sub.heads) / 10 + sum(sub.ffn) / 100}

    def macs(sub):  # noqa: ANN001, ANN202
        return float(sum(sub.heads) * 10 + sum(sub.ffn))

    run_search(space, ["acc", "macs"], evaluate, exact={"macs": macs}, evals=6, population=4, archive_dir=tmp_path)
    path = tmp_path / "archive.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "genes"}) + "\n" for r in rows))
    res = run_search(space, ["acc", "macs"], evaluate, exact={"macs": macs}, evals=10, population=4,
                     archive_dir=tmp_path, resume=True)
    assert len(res.rows) == 10 and res.new_evaluations == 4
