"""The run directory of a tune run: the output's lock and `<output>.partial` (`artifacts.StageWriter`), the run's
fingerprint (`run.json`), the checkpoint `--resume` continues from, the JSONL log, and the commit that publishes
the directory with its manifest. Rank 0 alone touches files; the other ranks learn its decisions
(`Group.agree`, docs/architecture.md "Several processes")."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli import data as D
from instatune_cli.artifacts import StageWriter, check_output, check_own_dir, remove_own, writing
from instatune_cli.distributed import RankError
from instatune_cli.errors import InstatuneError
from instatune_cli.seeds import seed_int
from instatune_cli.tune import checkpoint as C
from instatune_cli.tune.config import TuneConfig
from instatune_cli.tune.teacher import cache_key

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
LOGS_DIR = "logs"  # what --report-to writes (one folder per logger), part of the run
CALIB_EXAMPLES = 512


def precheck_output(cfg: TuneConfig) -> None:
    """The StageWriter rules, checked before any heavy work so a refused run costs nothing."""
    out = check_output(cfg.output, cfg.force, "tune", cfg.resume, tune_inputs(cfg))
    check_own_dir(C.parked_dir(out.with_name(out.name + ".partial")), C.PARKED_KIND, "the checkpoints of a commit")


def tune_inputs(cfg: TuneConfig) -> tuple[str | None, ...]:
    """What a tune run reads: never its output, nor inside it, nor around it (artifacts.check_not_input)."""
    return (cfg.model, cfg.data, cfg.eval_data, cfg.val_data, cfg.tokenizer, cfg.teacher, cfg.space)


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs the same run: the options that change the weights and digests of every input. A
    partial is resumed only by a run with the same fingerprint."""

    fingerprint: str
    extra: dict[str, Any]       # the digests, recorded in run.json
    model_id: str               # the model source, resolved
    teacher_key: str | None     # the teacher logits cache's key

    @classmethod
    def of(cls, cfg: TuneConfig, inp: Any) -> RunIdentity:
        train_digest = inp.train_enc.digest()
        tkey = cache_key(inp.teacher_dir, train_digest, inp.max_length) if inp.teacher_dir else None
        src = inp.model_src
        model_id = str(Path(src).resolve()) if Path(src).exists() else src
        # "processes": 1 is a constant on purpose. Runs made when --batch-size was per process recorded their
        # process count here: their single-process partials (the same global batch) stay resumable, and a
        # multi-process one (another global batch under today's meaning) is refused. The process count itself
        # is not fingerprinted: a checkpoint resumes with any number of processes.
        extra = {"model": model_id, "train": train_digest, "eval": inp.eval_enc.digest(),
                 "labels": inp.data.labels, "max_length": inp.max_length, "space": inp.space.to_dict(),
                 "teacher": tkey, "processes": 1}
        if inp.val_enc is not None:
            extra["val"] = inp.val_enc.digest()
        if inp.source is not None:
            extra["extract"] = inp.source.digest
        return cls(cfg.fingerprint(extra), extra, model_id, tkey)


class JsonlLog:
    """Append-only JSONL; on resume, records past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, keep_upto: int | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if keep_upto is not None and int(rec.get("step", 0)) <= keep_upto:
                    self.records.append(rec)
        with writing("the training log", path), open(path, "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.enabled:
            with writing("the training log", self.path), open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


@dataclass
class RunDirectory:
    """`<output>.partial` from `open` to `commit`. Until `open` the paths are unset; `Trainer` gets it opened."""

    cfg: TuneConfig
    group: Any                  # distributed.Group
    main: bool
    rank: int = 0
    writer: Any = None          # artifacts.StageWriter: only the main process opens it (and holds the lock)
    identity: RunIdentity | None = None
    partial: Path = Path()
    run_info: dict[str, Any] = field(default_factory=dict)
    resume_from: Path | None = None  # the checkpoint this session continues from
    log: JsonlLog | None = None

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.writer = StageWriter(Path(cfg.output), "tune", cfg.to_dict(), force=cfg.force, resume=cfg.resume,
                                  cleanup_on_error=False, inputs=tune_inputs(cfg), keep_if=C.worth_resuming)

    @property
    def fingerprint(self) -> str:
        assert self.identity is not None, "RunDirectory.open first"
        return self.identity.fingerprint

    @property
    def reorder(self) -> dict[str, Any] | None:
        """How the run reordered heads and neurons (run.json, then the manifest), None before it did."""
        return self.run_info.get("reorder")

    def open(self, identity: RunIdentity) -> None:
        """Open (or reopen) `<output>.partial`, refuse a partial of another run, pick the checkpoint to resume."""
        self.identity = identity
        partial, self.run_info, ckpt = self.group.agree(self._open_main)
        self.partial = Path(partial)
        self.resume_from = Path(ckpt) if ckpt else None
        if self.resume_from is not None and not (self.resume_from / C.STATE_FILE).is_file():
            raise RankError(f"process {self.rank} cannot see the checkpoint {self.resume_from} that rank 0 resumes "
                            "from; put --output on storage every node can read")
        keep = C.checkpoint_step(self.resume_from) if self.resume_from else 0
        self.log = JsonlLog(self.partial / LOG_FILE, keep_upto=keep, enabled=self.main)

    def _open_main(self) -> tuple[str, dict[str, Any], str | None]:
        """Rank 0's part of `open`, the only one touching the directory: take the lock, check or record the
        fingerprint, bring parked checkpoints back, pick the one to resume. Returns (partial, run info,
        checkpoint or None) for every rank."""
        cfg, fingerprint = self.cfg, self.fingerprint
        self.writer.open()
        self.partial = self.writer.path
        run_file = self.partial / RUN_FILE
        if run_file.is_file():
            self.run_info = json.loads(run_file.read_text())
            if self.run_info.get("fingerprint") != fingerprint:
                old = self.run_info.get("options", {})
                new = cfg.fingerprint_dict()
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                what = ("options " + ", ".join("--" + k.replace("_", "-") for k in diff)) if diff else \
                    "model, data, labels, space or teacher"
                raise InstatuneError(
                    f"{self.partial} belongs to another run (its {what} differ); rerun with the same options to "
                    "resume, or pass --force without --resume to start over"
                )
        else:
            assert self.identity is not None
            self.run_info = {"fingerprint": fingerprint, "options": cfg.fingerprint_dict(),
                             "extra": self.identity.extra}
            self.write_run_info()
        C.unpark_checkpoints(self.partial, fingerprint, cfg.resume)
        ckpt = C.latest_checkpoint(self.partial) if cfg.resume else None
        C.clear_torn(self.partial)
        return str(self.partial), self.run_info, str(ckpt) if ckpt else None

    def write_run_info(self) -> None:
        if self.main:
            with writing("the run's fingerprint", self.partial / RUN_FILE):
                (self.partial / RUN_FILE).write_text(json.dumps(self.run_info, indent=1, default=str))

    def record_reorder(self, info: dict[str, Any]) -> None:
        self.run_info["reorder"] = info
        self.write_run_info()

    def logs_dir(self, name: str) -> Path:
        """`<partial>/logs/<name>`: a logger's folder, committed with the run."""
        return self.partial / LOGS_DIR / name

    def write_outputs(self, adapter: Any, model: Any, inp: Any, space: Any, seed: int) -> None:
        """The super-network, tokenizer, space and the three splits into the partial directory."""
        partial, n_train = self.partial, len(inp.train_enc)
        with writing("the tuned super-network", partial / MODEL_DIR):
            adapter.save(model, inp.tok, partial / MODEL_DIR)
        with writing("the search space and the eval, validation and calibration splits", partial):
            (partial / "space.json").write_text(json.dumps(space.to_dict(), indent=2) + "\n")
            D.write_jsonl(partial / "eval.jsonl", inp.data.eval)
            if inp.val_enc is not None:
                D.write_jsonl(partial / "val.jsonl", inp.data.val)
            calib = list(range(n_train))
            random.Random(seed_int("calib", seed)).shuffle(calib)
            D.write_jsonl(partial / "calib.jsonl", inp.data.train.subset(sorted(calib[:CALIB_EXAMPLES])))

    def commit(self, model: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any]) -> Any:
        """Park the checkpoints, write the manifest and move the directory into place (rank 0); the parked
        checkpoints are deleted only once it is there."""
        C.park_checkpoints(self.partial)
        artifact = self.writer.commit(model=model, metrics=metrics, extra=extra)
        remove_own(C.parked_dir(self.partial), C.PARKED_KIND)
        return artifact

    def nan_stop(self, val: float, step: int, saved_step: int | None) -> None:
        """Stop a run whose loss is not finite, before the step is applied; the last checkpoint stays."""
        assert self.log is not None
        self.log.write({"event": "nan", "step": step + 1, "loss": str(val)})
        kept = (f"the last good checkpoint (step {saved_step}) is kept in {self.partial / C.CKPT_DIR}"
                if saved_step else f"no checkpoint was written yet (--save-every {self.cfg.save_every})")
        raise InstatuneError(
            f"loss became {val} at step {step + 1}; stopped without applying it and {kept}; lower --lr or check "
            "the data, then start over with --force"
        )
