"""The process group of a run started by `torchrun` or `accelerate launch`, reduced to the few collectives
instatune needs; without a launcher (no `WORLD_SIZE` in the environment) everything is a no-op on one process.

Who does what (docs: README "Scaling out"):

- tune: every rank trains on its shard of each global batch; the gradients of a whole optimizer step (all
  micro-batches, super-network and sampled sub-networks) are averaged with ONE all-reduce over a flat buffer
  (`Group.average_`); rank 0 alone writes the run directory, logs and progress.
- search: rank 0 runs the algorithm and owns the archive; every rank scores its share of the validation batches
  and the confusion counts are summed (`Group.sum_floats`).

Rank 0 decides everything that involves the file system (is the output free, which checkpoint to resume) and
tells the others (`Group.agree`). When rank 0 refuses to go on, the other ranks leave quietly with the same
exit code (`Follower`), so a launcher shows one error line, not one per process, and no rank hangs in a
collective waiting for a rank that has already gone.

torch and accelerate are imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from instatune_cli.errors import InstatuneError

T = TypeVar("T")


def env_world_size() -> int:
    """Processes the launcher started (`WORLD_SIZE`); 1 when not launched."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's global rank (`RANK`); 0 when not launched."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def launched() -> bool:
    return env_world_size() > 1


FOLLOWER_GRACE_S = 3.0


class Follower(SystemExit):
    """A non-zero rank leaving because of an error that rank 0 reports (exit code 2, nothing printed).

    A SystemExit, so the CLI's one-line error handler lets it through silently; rank 0 raises the real
    InstatuneError and prints the one line. The follower first waits `FOLLOWER_GRACE_S` (or until killed):
    a launcher stops every rank at the first exit it sees, and that must be rank 0's, after its message, so that
    it is also the one the launcher names as the root cause."""

    def __init__(self, code: int = 2, grace: float = FOLLOWER_GRACE_S) -> None:
        import time

        time.sleep(grace)
        super().__init__(code)


class RankError(InstatuneError):
    """An error only this rank meets (e.g. a checkpoint rank 0 wrote that this node cannot see): printed by the
    rank itself, not left to rank 0."""


@contextlib.contextmanager
def rank0_reports(rank: int) -> Iterator[None]:
    """On a non-zero rank, turn an InstatuneError into `Follower`: such errors are raised on all ranks alike
    (the same input, an agreed decision, a reduced loss), and rank 0 says it once. `RankError` still prints."""
    try:
        yield
    except RankError:
        raise
    except InstatuneError:
        if rank != 0:
            raise Follower(2) from None
        raise
    except Exception as e:  # noqa: BLE001 - only a lost peer becomes one line; anything else is a bug, re-raised
        if not (launched() and peer_lost(e)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RankError(f"process {rank} lost another process of the launched run ({first}); it stopped or was "
                        "killed (the launcher's report names it): once that is fixed, relaunch with --resume to "
                        "continue where the run stopped (with any number of processes)") from None


PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
             "nccl communicator was aborted", "connection refused")


def peer_lost(e: BaseException) -> bool:
    """A collective that failed because another rank went away (gloo/NCCL say so in their message)."""
    name = type(e).__name__
    text = str(e).lower()
    return name in ("DistBackendError", "DistNetworkError") or (
        isinstance(e, RuntimeError) and any(k in text for k in PEER_LOST))


@dataclass
class Group:
    """This process's view of the run: rank, world size, the device collectives use, the process group
    (None: the default one). `Group()` is a single process and every method is a cheap no-op."""

    rank: int = 0
    world: int = 1
    device: Any = None
    pg: Any = None
    owned: bool = False  # this module set the process group up (`cpu_group`), so `close` tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # ---- objects ------------------------------------------------------------------------------------
    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled; for small control messages only)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.pg, device=self._object_device())
        return box[0]  # type: ignore[return-value]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def _object_device(self) -> Any:
        import torch

        return self.device if self.device is not None and self.pg is None else torch.device("cpu")

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only (a decision that reads or writes files) and hand its result to every rank.

        If `fn` fails on rank 0, rank 0 re-raises it and the other ranks leave with `Follower` (instead of
        waiting in the next collective until the launcher's timeout). Doubles as a barrier."""
        if not self.active:
            return fn()
        if self.main:
            try:
                value = fn()
            except BaseException:
                self.broadcast_object(("failed", None))
                raise
            self.broadcast_object(("ok", value))
            return value
        status, value = self.broadcast_object(("", None))
        if status != "ok":
            raise Follower(2)
        return value  # type: ignore[no-any-return]

    # ---- tensors ------------------------------------------------------------------------------------
    def average_(self, tensors: Sequence[Any]) -> None:
        """Average `tensors` (same dtype) across ranks in place with ONE all-reduce over a flat buffer.

        The tune loop calls it once per optimizer step with every parameter's gradient (zeros where a
        parameter got none on this rank) and the step's loss terms, instead of DDP's all-reduce after each of
        the M+1 backward passes."""
        if not self.active or not tensors:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        with torch.no_grad():
            flat = _flatten_dense_tensors([t.detach() for t in tensors])
            dist.all_reduce(flat, group=self.pg)  # SUM: gloo has no AVG
            flat.div_(self.world)
            for t, avg in zip(tensors, _unflatten_dense_tensors(flat, list(tensors)), strict=True):
                t.copy_(avg)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of every rank's `values` (an empty list from a rank with nothing counts as zeros),
        added in rank order so every rank gets the same bits."""
        if not self.active:
            return list(values)
        parts = [p for p in self.all_gather_object(list(values)) if p]
        if not parts:
            return []
        return [sum(col) for col in zip(*parts, strict=True)]

    def broadcast_(self, tensors: Sequence[Any]) -> None:
        """Overwrite `tensors` with rank 0's values, one broadcast per dtype (DDP does this at construction)."""
        if not self.active or not tensors:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[Any, list[Any]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():  # parameters are leaves that require grad
            for group in by_dtype.values():
                flat = _flatten_dense_tensors([t.detach() for t in group])
                dist.broadcast(flat, src=0, group=self.pg)
                for t, v in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
                    t.copy_(v)

    def gather_rows(self, t: Any) -> list[Any]:
        """Every rank's 2-D tensor `t` (row counts may differ, even be 0), on every rank, in rank order."""
        if not self.active:
            return [t]
        import torch
        import torch.distributed as dist

        n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.pg)
        counts = [int(s.item()) for s in sizes]
        width = max(counts)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        bufs = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(bufs, padded.contiguous(), group=self.pg)
        return [b[:c] for b, c in zip(bufs, counts, strict=True)]


SINGLE = Group()


def from_accelerator(acc: Any) -> Group:
    """The tune loop's group: accelerate's default process group (NCCL on GPUs, gloo on CPUs)."""
    return Group(rank=acc.process_index, world=acc.num_processes, device=acc.device)


def group_up() -> bool:
    """Whether a default process group exists (one an API user's launched script set up before calling us)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def end_accelerator(acc: Any) -> None:
    """After a launched tune run that succeeded on every rank: wait for all of them, then destroy the process
    group accelerate set up for it and forget accelerate's state, so a later run in the same process starts
    afresh. A rank that leaves with its group up tears the group's threads down during interpreter exit, which
    once aborted a rank at exit ("terminate called without an active exception") after a run that had
    finished. Not on failure (a barrier would wait for a dead rank), nor for a group the caller set up."""
    acc.wait_for_everyone()
    acc.end_training()
    forget_accelerate()


def forget_accelerate() -> None:
    """Reset accelerate's process-wide singletons, so the next `Accelerator` in this process reads its settings
    (processes, precision, accumulation) afresh instead of inheriting the last run's."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def cpu_group() -> Group:
    """The search's group: a gloo group over the launcher's processes (the search evaluates on the CPU and
    its messages are small); set up here when nothing did so before. `Group()` when not launched."""
    if not launched():
        return Group()
    import torch
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="gloo")
    pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Group(rank=dist.get_rank(), world=dist.get_world_size(), device=torch.device("cpu"), pg=pg, owned=owned)


def close(group: Group) -> None:
    """Tear down a process group `cpu_group` set up (so torch does not warn about it at exit); one the caller
    set up (an API user's own script) is left alone."""
    if group.owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
