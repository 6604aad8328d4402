"""A training budget in wall time, turned into steps: what `trainer.max_time` means for the schedule.

A run bounded by `trainer.max_time` (and not by `optim.total_steps`) measures its own pace once it is steady: the
seconds a training step takes (steps `MEASURE` to `MEASURE + WINDOW`), and the seconds a validation batch takes to
decode (the sanity check's last batch, decoded with the untrained model, whose outputs run to the longest the
decoding allows). It then plans how many steps the budget allows, leaving time for the validations that fall inside
the run and for the final scoring (every candidate's validation and test), and shapes the schedule to end there
(`WarmupSchedule`'s total and warm-up). Every `CHECK` steps after that it plans again from the pace of the last
`PACE` steps, with the cost of a validation batch measured again as training changes it: by each validation inside
the run, and by validating the sanity check's batch once more at each share of the planned steps in `PROBES` (where
no validation ran since the last such point). A plan that allows fewer steps than the run's (it fell behind: another
process took the CPU) is always taken, so that the run ends in time; one that allows more is taken while the
schedule's rate so far stays as it is (noam, constant, any warm-up, wsd before its cooldown), so that a run slowed
early, or one whose scoring turned out cheaper than reserved, takes the time back. The decision is one log line,
`plan.json` in the run directory, the callback's state in every checkpoint (a resumed run keeps it and the budget it
has spent, and stays equal to the run it continues) and `optim.total_steps` in the run's config.yaml (how the same
schedule is reproduced on another machine).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch

from seq2seq.runs import RunDir
from seq2seq.schedule import WarmupSchedule, warmup_for
from seq2seq.sharding import gathered

log = logging.getLogger("seq2seq")

MEASURE = 5  # steps before the pace is measured (the first ones warm caches, allocators and compiled graphs)
WINDOW = 20  # steps the first pace is measured over
CHECK = 10  # once planned, the run plans again every CHECK steps,
PACE = 50  # from the pace of the last PACE steps
SLACK = 0.02  # and takes a plan that differs from its own by more than this share of its steps
PROBES = (0.5, 0.75)  # shares of the planned steps at which the sanity check's batch is validated again
UNMEASURED_RESERVE = 0.1  # the share of the budget kept for scoring when no validation batch was timed


def seconds(max_time: str) -> float:
    """DD:HH:MM:SS as seconds."""
    days, hours, minutes, secs = (int(part) for part in max_time.split(":"))
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=secs).total_seconds()


@dataclass(frozen=True)
class Costs:
    """What the plan is computed from: the budget and elapsed time (s), a training step and a validation batch (s),
    and the run's shape (batches per validation and per test, steps between validations, candidates scored at the
    end)."""

    budget: float
    elapsed: float
    done: int
    step: float
    val_batch: float | None
    val_batches: int
    test_batches: int
    steps_per_validation: int | None
    candidates: int


@dataclass(frozen=True)
class Plan:
    """The decision: steps in all, warm-up, where validations fall, and what it was computed from."""

    total_steps: int
    warmup_steps: int
    seconds_per_step: float
    reserved_seconds: float
    validations: list[int]


def plan_steps(costs: Costs) -> tuple[int, float]:
    """The steps the budget allows, and the seconds reserved for final scoring.

    A run that ends on a validation step is scored by that validation (the reserve counts validating the final
    weights), so the time a run of `n` steps takes counts the validations before step `n`: it grows with `n`, and
    the largest `n` that fits is found by bisection."""
    if costs.val_batch is None:
        reserve, validation = UNMEASURED_RESERVE * costs.budget, 0.0
    else:
        reserve = costs.candidates * (costs.val_batches + costs.test_batches) * costs.val_batch
        validation = costs.val_batches * costs.val_batch
    left = max(0.0, costs.budget - costs.elapsed - reserve)
    every = costs.steps_per_validation

    def fits(steps: int) -> bool:
        before = (steps - 1) // every - costs.done // every if every else 0  # validations still to come
        return (steps - costs.done) * costs.step + before * validation <= left

    low, high = costs.done, costs.done + int(left / costs.step)  # fits(low); nothing past high does
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return max(low, costs.done + 1), reserve


class BudgetPlanner(L.Callback):
    """Plans a time-bounded run's steps from its measured pace, and holds the plan for checkpoints."""

    def __init__(self, max_time: str, run_dir: Path, candidates: int) -> None:
        self.budget, self.run_dir, self.candidates = seconds(max_time), run_dir, candidates
        self.plan: Plan | None = None
        self._spent = 0.0  # budget spent before this process started (a resumed run)
        self._probed = 0  # PROBES done
        self._changes = 0  # plans taken after the first, in this process
        self._started = self._sanity = self._clock = self._batch_start = None
        self._val_batch: float | None = None  # seconds a validation batch takes, as last measured
        self._probe: Any = None  # the sanity check's last batch
        self._marks: deque[tuple[int, float, float]] = deque(maxlen=PACE // CHECK)  # (step, clock, aside)
        self._aside = 0.0  # seconds spent validating and probing, left out of the pace
        self._bound: int | None = None  # the run's own step bound
        self._scored: tuple[int, int] | None = None  # validation and test batches

    def on_sanity_check_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sanity = time.monotonic()

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._clock = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            took = time.monotonic() - self._clock  # a validation inside the run: time not spent training, and
            self._aside += took  # what decoding costs now
            batches = int(sum(trainer.num_val_batches))
            self._val_batch = took / batches if batches else self._val_batch

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._batch_start = time.monotonic()

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                                *args: Any) -> None:
        if trainer.sanity_checking:  # the last sanity batch: the first one also pays for warming up
            self._val_batch, self._probe = time.monotonic() - self._batch_start, batch

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = self._sanity or time.monotonic()  # the budget counts from the sanity check on
        bound = trainer.estimated_stepping_batches  # the run's other bounds (max_steps, max_epochs of batches):
        self._bound = int(bound) if math.isfinite(bound) else None  # a plan never goes past them
        if self.plan is not None:  # resumed: the plan the run made
            self._apply(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step, now = trainer.global_step, time.monotonic()
        if self._marks and step - self._marks[-1][0] >= (WINDOW if self.plan is None else CHECK):
            first = self._marks[0]
            pace = (now - first[1] - (self._aside - first[2])) / (step - first[0])
            if self.plan is not None and self._probed < len(PROBES) and step >= PROBES[self._probed] * \
                    self.plan.total_steps:
                since = PROBES[self._probed - 1] * self.plan.total_steps if self._probed else 0
                self._probed += 1
                # a validation since the last probe point measured it better (the batch is slower than the average)
                if max(module.validated, default=-1) < since:
                    self._validate_again(trainer, module)
            # rank 0's clock decides for every rank
            decision = Plan(**trainer.strategy.broadcast(self._decide(trainer, module, pace)))
            previous = self.plan
            if previous is None or self._takes(trainer, decision):
                self._changes += previous is not None
                self.plan = decision
                self._apply(trainer, module)
                if trainer.is_global_zero:
                    self._record(module, previous)
            batch = "unmeasured" if self._val_batch is None else f"{self._val_batch:.2f} s"
            log.debug("budget at step %d: %.3f s a step over the last %d, a validation batch %s; %d steps allow",
                      step, pace, step - first[0], batch, decision.total_steps)
            self._marks.append((step, time.monotonic(), self._aside))
        elif not self._marks and (self.plan is not None or step >= MEASURE):
            self._marks.append((step, now, self._aside))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.plan is not None and trainer.is_global_zero:
            plan = self.plan
            changes = f"{self._changes} time{'s' * (self._changes != 1)}"
            log.info("budget: training ended at step %d of %d planned (%.2f s a step, %.0f s kept for final scoring; "
                     "the plan changed %s as the pace and the cost of scoring were measured again)",
                     trainer.global_step, plan.total_steps, plan.seconds_per_step, plan.reserved_seconds, changes)

    def _validate_again(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Validate the sanity check's batch again with the weights as they are now: what a batch costs now."""
        if self._probe is None:
            return
        start, training = time.monotonic(), module.training
        module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context(), gathered(module.model):  # every rank
            # validates its own batch, in the precision validation runs in; the scores go to a copy of the metrics
            module.loss(self._probe)
            module.decode_into(module.metrics["val"].clone(), self._probe)
        module.train(training)
        self._val_batch = time.monotonic() - start
        self._aside += self._val_batch

    def _takes(self, trainer: L.Trainer, decision: Plan) -> bool:
        """Whether the run changes to `decision`: always when it allows fewer steps, and when it allows more only
        while the rate the schedule has given so far stays as it is."""
        planned = self.plan.total_steps
        if abs(decision.total_steps - planned) <= SLACK * planned:
            return False
        if decision.total_steps < planned:
            return True
        schedule: WarmupSchedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
        last = trainer.global_step - 1  # the step just taken
        return schedule(last) == replace(schedule, total=decision.total_steps)(last)

    def _decide(self, trainer: L.Trainer, module: L.LightningModule, pace: float) -> dict[str, Any]:
        """The plan for what is left of the budget at `pace` seconds a step."""
        batches = trainer.num_training_batches
        every = trainer.check_val_every_n_epoch
        steps_per_validation = (int(batches * every) if trainer.val_check_interval == 1.0 and math.isfinite(batches)
                                else None)
        if self._scored is None:  # the batches final scoring decodes: counted once
            datamodule = trainer.datamodule
            test = len(datamodule.test_dataloader()) if "test" in datamodule.examples else 0
            self._scored = (int(sum(trainer.num_val_batches)) if trainer.num_val_batches else 0, test)
        costs = Costs(self.budget, self._elapsed(), trainer.global_step, pace, self._val_batch, *self._scored,
                      steps_per_validation, self.candidates)
        total, reserve = plan_steps(costs)
        total = min(total, self._bound or total)
        validations = (list(range(steps_per_validation, total + 1, steps_per_validation))
                       if steps_per_validation else [])
        warmup = self.plan.warmup_steps if self.plan else warmup_for(module.config.optim, total)
        return asdict(Plan(total, warmup, pace, reserve, validations))

    def _elapsed(self) -> float:
        return self._spent + time.monotonic() - self._started

    def _apply(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        schedule: WarmupSchedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
        schedule.total, schedule.warmup = self.plan.total_steps, self.plan.warmup_steps
        trainer.fit_loop.epoch_loop.max_steps = self.plan.total_steps

    def _record(self, module: L.LightningModule, previous: Plan | None) -> None:
        plan = self.plan
        shown = ", ".join(map(str, plan.validations[:8])) + (" ..." if len(plan.validations) > 8 else "")
        if previous is not None:  # (the progress lines show the steps planned; `on_train_end` sums the changes up)
            log.debug("budget: %.2f s a step, %.0f s kept for final scoring; %d steps planned instead of %d, %s",
                      plan.seconds_per_step, plan.reserved_seconds, plan.total_steps, previous.total_steps,
                      "so that the run ends in time" if plan.total_steps < previous.total_steps else
                      "to use the time it has")
        else:
            log.info("budget %s: %.2f s a step measured over steps %d-%d; %d steps planned (warm-up %d, %s schedule "
                     "ending there), %.0f s kept for final scoring; validations at steps %s",
                     timedelta(seconds=self.budget), plan.seconds_per_step, MEASURE, MEASURE + WINDOW,
                     plan.total_steps, plan.warmup_steps, module.config.optim.schedule, plan.reserved_seconds,
                     shown or "the end only")
        (self.run_dir / "plan.json").write_text(json.dumps(asdict(plan), indent=2) + "\n")
        run = RunDir(self.run_dir)
        config = run.read_config()
        config["optim"]["total_steps"] = plan.total_steps
        run.write_config(config)

    def state_dict(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        spent = self._elapsed() if self._started is not None else self._spent
        return {"plan": asdict(self.plan), "spent": spent, "probed": self._probed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "total_steps" in state:  # written before the budget spent was kept
            state = {"plan": state, "spent": 0.0, "probed": 0}
        self.plan = Plan(**state["plan"]) if state else None
        self._spent, self._probed = state.get("spent", 0.0), state.get("probed", 0)
