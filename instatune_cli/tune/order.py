"""Which training examples each micro-batch holds: a function of the seed, the data and --batch-size only, never
of the process count (loop.py's module docstring, "Determinism")."""

from __future__ import annotations

import random
from typing import Any

from instatune_cli import data as D
from instatune_cli.seeds import seed_int
from instatune_cli.tune.state import TrainPlan


class BatchOrder:
    """Epoch e is a permutation drawn from `random.Random((seed, "order", e))`, regrouped into batches of
    similar lengths by the same generator with `group_by_length` (`data.length_grouped`). One epoch is cached."""

    def __init__(self, train_enc: Any, plan: TrainPlan, seed: int, group_by_length: bool, rank: int) -> None:
        self.train_enc, self.plan, self.seed, self.group_by_length, self.rank = (train_enc, plan, seed,
                                                                                 group_by_length, rank)
        self._epoch: dict[int, list[int]] = {}

    def epoch(self, e: int) -> list[int]:
        if e not in self._epoch:
            self._epoch.clear()
            perm = list(range(self.plan.n_train))
            rng = random.Random(seed_int("order", self.seed, e))
            rng.shuffle(perm)
            if self.group_by_length:
                perm = D.length_grouped(perm, self.train_enc.lengths(), self.plan.global_batch, rng)
            self._epoch[e] = perm
        return self._epoch[e]

    def global_micro(self, g: int) -> list[int]:
        """Example indices of global micro-batch `g` (all processes together)."""
        G = self.plan.global_batch
        e, k = divmod(g, self.plan.micro_per_epoch)
        return self.epoch(e)[k * G : (k + 1) * G]

    def micro(self, g: int) -> list[int]:
        """This process's slice of global micro-batch `g` (the whole of it on one process). A short last batch
        of an epoch leaves the last ranks fewer examples, or none."""
        B = self.plan.per_process
        return self.global_micro(g)[self.rank * B : (self.rank + 1) * B]
