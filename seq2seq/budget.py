"""A training budget in wall time, turned into steps: what `trainer.max_time` means for the schedule.

A run bounded by `trainer.max_time` (and not by `optim.total_steps`) measures its own pace once it is steady: the
seconds a training step takes (steps `MEASURE` to `MEASURE + WINDOW`), and the seconds a validation batch takes (the
sanity check decodes with the untrained model, whose outputs run to the longest the decoding allows: the slowest a
validation gets). It then plans how many steps the budget allows, leaving time for the validations that fall inside
the run and for the final scoring (every candidate's validation and test), and shapes the schedule to end there
(`WarmupSchedule`'s total and warm-up). Every `CHECK` steps after that the pace is measured again, and a run
that has fallen behind (another process took the CPU) plans fewer steps so that it still ends in time; it never
plans more. The decision is one log line, `plan.json` in the run directory, the callback's state in
every checkpoint (a resumed run keeps it, and stays equal to the run it continues) and `optim.total_steps` in the
run's config.yaml (how the same schedule is reproduced on another machine).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L

from seq2seq.runs import RunDir
from seq2seq.schedule import WarmupSchedule, warmup_for

log = logging.getLogger("seq2seq")

MEASURE = 5  # steps before the pace is measured (the first ones warm caches, allocators and compiled graphs)
WINDOW = 20  # steps the pace is measured over
CHECK = 10  # once planned, the pace is measured again every CHECK steps: a run falling behind plans fewer steps,
SLACK = 0.01  # when it is more than this share of its planned steps behind
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
    """The steps the budget allows, and the seconds reserved for final scoring."""
    if costs.val_batch is None:
        reserve, validation = UNMEASURED_RESERVE * costs.budget, 0.0
    else:
        reserve = costs.candidates * (costs.val_batches + costs.test_batches) * costs.val_batch
        validation = costs.val_batches * costs.val_batch
    left = max(0.0, costs.budget - costs.elapsed - reserve)
    steps = costs.done + int(left / costs.step)
    for _ in range(5):  # the validations inside the run take time from its steps, which move them
        inside = steps // costs.steps_per_validation if costs.steps_per_validation else 0
        steps = costs.done + max(0, int((left - inside * validation) / costs.step))
    return max(steps, costs.done + 1), reserve


class BudgetPlanner(L.Callback):
    """Plans a time-bounded run's steps once its pace is measured, and holds the plan for checkpoints."""

    def __init__(self, max_time: str, run_dir: Path, candidates: int) -> None:
        self.budget, self.run_dir, self.candidates = seconds(max_time), run_dir, candidates
        self.plan: Plan | None = None
        self._started = self._sanity = self._sanity_time = self._batch_start = self._validation_start = None
        self._mark: tuple[int, float, float] | None = None  # (step, clock, time spent validating) at the mark
        self._bound: int | None = None  # the run's own step bound
        self._scored: tuple[int, int] | None = None  # validation and test batches
        self._validating = 0.0

    def on_sanity_check_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sanity = time.monotonic()

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # time not spent training, left out of the pace
            self._validating += time.monotonic() - self._validation_start

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._batch_start = time.monotonic()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.sanity_checking:  # the last sanity batch: the first one also pays for warming up
            self._sanity_time = time.monotonic() - self._batch_start

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = self._sanity or time.monotonic()  # the budget counts from the sanity check on
        if self.plan is not None:  # resumed: the plan the run made
            self._apply(trainer, module)
        else:  # the run's other bounds (max_steps, max_epochs of batches): a plan never goes past them
            self._bound = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step, now = trainer.global_step, time.monotonic()
        if self._mark is not None and step - self._mark[0] >= (WINDOW if self.plan is None else CHECK):
            pace = (now - self._mark[1] - (self._validating - self._mark[2])) / (step - self._mark[0])
            # rank 0's clock decides for every rank
            decision = Plan(**trainer.strategy.broadcast(self._decide(trainer, module, pace)))
            if self.plan is None or decision.total_steps < self.plan.total_steps - SLACK * self.plan.total_steps:
                late = self.plan is not None
                self.plan = decision
                self._apply(trainer, module)
                if trainer.is_global_zero:
                    self._record(module, late)
            self._mark = None
        if self._mark is None and (self.plan is not None or step >= MEASURE):
            self._mark = (step, now, self._validating)

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
        costs = Costs(self.budget, time.monotonic() - self._started, trainer.global_step, pace, self._sanity_time,
                      *self._scored, steps_per_validation, self.candidates)
        total, reserve = plan_steps(costs)
        total = min(total, self._bound or total)
        validations = (list(range(steps_per_validation, total + 1, steps_per_validation))
                       if steps_per_validation else [])
        warmup = self.plan.warmup_steps if self.plan else warmup_for(module.config.optim, total)
        return asdict(Plan(total, warmup, pace, reserve, validations))

    def _apply(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        schedule: WarmupSchedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
        schedule.total, schedule.warmup = self.plan.total_steps, self.plan.warmup_steps
        trainer.fit_loop.epoch_loop.max_steps = self.plan.total_steps

    def _record(self, module: L.LightningModule, late: bool) -> None:
        plan = self.plan
        shown = ", ".join(map(str, plan.validations[:8])) + (" ..." if len(plan.validations) > 8 else "")
        if late:
            log.info("budget: steps now take %.2f s; %d steps planned instead, so that the run ends in time",
                     plan.seconds_per_step, plan.total_steps)
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
        return {} if self.plan is None else asdict(self.plan)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan = Plan(**state) if state else None
