"""One source of truth for options (docs/architecture.md, "Options and stages"): every command, run with no
options, hands its stage exactly the stage's options dataclass with its own defaults; the latency options of
export, quantize and search are one definition; stages take their options object (or its fields) and return
their typed result."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from instatune_cli.cli.app import app
from instatune_cli.cli.common import defaults
from instatune_cli.deliver import ExportOptions, ExtractOptions
from instatune_cli.measure.latency import LatencyOptions
from instatune_cli.quantize.stage import QuantizeOptions
from instatune_cli.search.stage import SearchOptions
from instatune_cli.tune.config import TuneConfig

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]

#: command -> (module, stage function the command calls, the least arguments, the options it must hand over)
STAGES: dict[str, tuple[str, str, list[str], Any]] = {
    "tune": ("instatune_cli.tune.loop", "run_tune", ["MODEL"], TuneConfig(model="MODEL")),
    "search": ("instatune_cli.search.stage", "search_stage", ["RUN"], SearchOptions()),
    "extract": ("instatune_cli.deliver", "extract_stage", ["SRC"], ExtractOptions()),
    "quantize": ("instatune_cli.quantize.stage", "quantize_stage", ["SRC"], QuantizeOptions()),
    "export": ("instatune_cli.deliver", "export_stage", ["SRC"], ExportOptions()),
}
NO_STAGE = {"env"}
CONFIG = '{"layers": 2, "heads": [2, 4], "ffn": [25, 37]}'  # a sub-network of the tiny tune run


class Handed(Exception):
    """Raised by a stand-in stage with what the command handed it."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("handed")
        self.args_, self.kwargs = args, kwargs


def _handed(monkeypatch: pytest.MonkeyPatch, name: str, *argv: str) -> Any:
    module, func, least, want = STAGES[name]

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        raise Handed(args, kwargs)

    monkeypatch.setattr(importlib.import_module(module), func, stand_in)
    r = CliRunner().invoke(app, [name, *least, *argv])
    assert isinstance(r.exception, Handed), r.output
    got = [a for a in (*r.exception.args_, *r.exception.kwargs.values()) if isinstance(a, type(want))]
    assert len(got) == 1, f"instatune {name} handed its stage no single {type(want).__name__}"
    return got[0]


def test_every_stage_command_is_checked():
    assert set(STAGES) | NO_STAGE == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_command_without_options_hands_its_stage_the_dataclass_defaults(monkeypatch, name):
    got, want = _handed(monkeypatch, name), STAGES[name][3]
    drift = {f.name: (getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)
             if getattr(got, f.name) != getattr(want, f.name)}
    assert not drift, f"instatune {name}: CLI default != {type(want).__name__} default (cli, dataclass): {drift}"


def test_options_given_reach_the_stage(monkeypatch):
    """The check above cannot pass by ignoring the options: given values arrive (the inverted flags too)."""
    got = _handed(monkeypatch, "search", "--objectives", "acc,size", "--no-int4", "--latency-batch", "4",
                  "--max-macs", "6G")
    assert (got.objectives, got.int4, got.latency_batch, got.constraints) == (["acc", "size"], False, 4,
                                                                              ["max-macs=6G"])
    got = _handed(monkeypatch, "export", "--no-compare", "--runs", "3", "--seq-len", "64")
    assert (got.compare_full, got.runs, got.seq_len) == (False, 3, 64)
    got = _handed(monkeypatch, "quantize", "--compile", "--threads", "2", "--engine", "inc")
    assert (got.compile, got.threads, got.engine) == (True, 2, "inc")
    assert _handed(monkeypatch, "tune", "--json", "--lr", "0.001").lr == 0.001


#: options that show their field's default as text: `--objectives acc,macs` is the list ["acc", "macs"]
AS_TEXT = {("search", "objectives"): ",".join}


def test_shown_defaults_are_the_dataclass_defaults():
    """What help shows is what runs: each option named like a field shows that field's default."""
    for name, (_, _, _, want) in STAGES.items():
        fields = vars(defaults(type(want)))
        for p in COMMANDS[name].params:  # type: ignore[attr-defined]
            if p.name in fields:
                shown = AS_TEXT.get((name, p.name), lambda v: v)(fields[p.name])
                assert p.default == shown, f"instatune {name} --{p.name}"


@pytest.mark.parametrize(("options", "prefix"), [(ExportOptions, ""), (QuantizeOptions, ""),
                                                 (SearchOptions, "latency_")])
def test_latency_options_are_one_definition(options, prefix):
    ours = defaults(LatencyOptions)
    for f in dataclasses.fields(LatencyOptions):
        if hasattr(options(), prefix + f.name):  # the search's objective has no --latency-runs
            assert getattr(options(), prefix + f.name) == getattr(ours, f.name)
    for cmd, flags in (("export", "--batch --seq-len --threads --runs"),
                       ("quantize", "--batch --seq-len --threads --runs"),
                       ("search", "--latency-batch --latency-seq-len --latency-threads")):
        shown = {p.opts[0]: p for p in COMMANDS[cmd].params}  # type: ignore[attr-defined]
        for flag in flags.split():
            p = shown[flag]
            assert p.default == getattr(ours, flag.removeprefix("--latency-").removeprefix("--").replace("-", "_"))
            assert p.rich_help_panel == "Measuring"


def test_defaults_reads_factories_fresh_and_leaves_out_required_fields():
    @dataclasses.dataclass
    class Opts:
        needed: str
        n: int = 3
        names: list[str] = dataclasses.field(default_factory=lambda: ["a"])

    d = defaults(Opts)
    assert (d.n, d.names) == (3, ["a"]) and not hasattr(d, "needed")
    d.names.append("b")
    assert defaults(Opts).names == ["a"]  # a command's list default is never shared with the dataclass


def test_a_stage_takes_its_options_or_their_fields_never_both():
    from instatune_cli.artifacts import stage_options

    assert stage_options(ExportOptions, None, {"runs": 3}) == ExportOptions(runs=3)
    given = ExportOptions(int8=True)
    assert stage_options(ExportOptions, given, {}) is given
    with pytest.raises(TypeError, match="not both"):
        stage_options(ExportOptions, given, {"runs": 3})
    with pytest.raises(TypeError):  # a misspelt field is refused, as a keyword argument would be
        stage_options(ExportOptions, None, {"run": 3})


def test_stages_return_their_typed_result(tiny_tune_run, tmp_path):
    """extract and export, the cheap stages (search: tests/search; quantize: tests/quantize; tune: TuneResult):
    each returns its result dataclass, whose figures are the manifest's."""
    from instatune_cli import artifacts
    from instatune_cli.deliver import ExportResult, ExtractResult, export_stage, extract_stage

    ext = extract_stage(tiny_tune_run, tmp_path / "e", ExtractOptions(config=CONFIG))
    assert isinstance(ext, ExtractResult) and isinstance(ext.artifact, artifacts.Artifact)
    on_disk = artifacts.load(ext.path, "extract")
    assert ext.metrics == on_disk.metrics and ext.subnet_name == on_disk.model["subnet_name"] == "L2-h2.4-f25.37"
    figures = [f.name for f in dataclasses.fields(ExtractResult) if f.name not in ("artifact", "subnet_name")]
    assert {n: getattr(ext, n) for n in figures} == {n: on_disk.metrics[n] for n in figures}
    assert isinstance(ext.params, int) and 0 < ext.macs_reduction < 1
    exp = export_stage(ext.path, tmp_path / "x", runs=2, compare_full=False)  # the fields, by keyword
    assert isinstance(exp, ExportResult) and exp.onnx.is_file() and exp.int8 is None and exp.int8_onnx is None
    assert exp.latency_supernet is None and exp.speedup is None
    assert exp.latency == artifacts.load(exp.path, "export").metrics["latency"] and exp.latency["runs"] == 2
    assert artifacts.load(exp.path, "export").options == {
        "source": str(ext.path), "subnet": None, "config": None, "int8": False, "batch": 1, "seq_len": None,
        "threads": None, "runs": 2, "atol": 1e-4}
