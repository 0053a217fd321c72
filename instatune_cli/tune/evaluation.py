"""Scoring during a tune run: the super-network and the smallest sub-network on the eval split and the validation
split (rank 0 alone; the other ranks wait, `Group.agree`)."""

from __future__ import annotations

from typing import Any

from instatune_cli.measure.accuracy import Evaluator


class Evaluation:
    """The run's evaluators (empty on ranks other than 0) and how a score is shown."""

    def __init__(self, adapter: Any, model: Any, inp: Any, smallest: Any, batch_size: int, device: Any,
                 autocast: Any, main: bool) -> None:
        self.adapter, self.model, self.inp, self.smallest, self.autocast = adapter, model, inp, smallest, autocast
        self.evaluators: dict[str, Any] = {}
        if not main:
            return
        metric = inp.metric
        self.evaluators["eval"] = Evaluator(model, adapter.eval_batches(inp.eval_enc, batch_size), device,
                                            metric=metric)
        if inp.val_enc is not None:
            self.evaluators["val"] = Evaluator(model, adapter.eval_batches(inp.val_enc, batch_size), device,
                                               metric=metric)

    def evaluate(self) -> dict[str, Any]:
        """Super-network and smallest sub-network on the eval split (and the validation split if any): accuracy,
        and the task's metric as `super_[val_]<metric>` when it is not accuracy (e.g. `super_mcc`); a regressor
        has no accuracy and reports `super_[val_]mse` beside its correlation. `super_[val_]collapsed`: no better
        than a constant predictor (measure.metrics)."""
        out: dict[str, Any] = {}
        metric = self.inp.metric
        for split, ev in self.evaluators.items():
            pre = "" if split == "eval" else "val_"
            with self.autocast():  # what a prepared model's forward did (a no-op without mixed precision)
                sup = ev.evaluate(None)
                small = ev.evaluate(self.smallest)
            beside = "mse" if self.inp.data.regression else "accuracy"
            out.update({f"super_{pre}{beside}": getattr(sup, beside),
                        f"smallest_{pre}{beside}": getattr(small, beside)})
            if metric != "accuracy":
                out.update({f"super_{pre}{metric}": sup.score, f"smallest_{pre}{metric}": small.score})
            out.update({f"super_{pre}collapsed": sup.collapsed, f"smallest_{pre}collapsed": small.collapsed})
            if split == "eval":
                out.update({"eval_loss": sup.loss, "smallest_eval_loss": small.loss})
        self.adapter.activate(self.model, None)
        return out

    def scores_line(self, ev: dict[str, Any]) -> str:
        """`super mcc 0.4120 (acc 80.13%), smallest L3-h4-f384 mcc 0.1034 (acc 71.20%)`: the task's metric first,
        accuracy (a regressor: mse) beside it, `collapsed` where no better than a constant predictor."""
        metric = self.inp.metric
        beside = "mse" if self.inp.data.regression else ("acc" if metric != "accuracy" else "")
        key = {"mse": "mse", "acc": "accuracy"}.get(beside, "")

        def fmt(name: str, v: float) -> str:  # shares as percentages, as `search` prints them; the rest as numbers
            return f"{100 * v:.2f}%" if name in ("accuracy", "f1") else f"{v:.4f}"

        def one(who: str) -> str:
            shown = "acc" if metric == "accuracy" else metric
            text = f"{shown} {fmt(metric, ev[f'{who}_{metric}'])}"
            if beside:
                text += f" ({beside} {fmt(key, ev[f'{who}_{key}'])})"
            return text + (" collapsed" if ev.get(f"{who}_collapsed") else "")

        return f"super {one('super')}, smallest {self.smallest.name} {one('smallest')}"
