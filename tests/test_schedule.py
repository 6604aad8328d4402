import dataclasses
import itertools
import math

import pytest
import torch

from seq2seq.budget import Costs, plan_steps
from seq2seq.errors import ConfigError
from seq2seq.schedule import OptimSpec, WarmupSchedule, configure, warmup_for


def test_noam_schedule_follows_the_paper_formula():
    sched = WarmupSchedule("noam", d_model=512, warmup=4000, total=0)
    for step in (1, 100, 4000, 10000):
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert math.isclose(sched(step - 1), expected)
    peak = max(range(8000), key=sched)
    assert peak == 3999, "the rate rises linearly until step `warmup`, then decays as step^-0.5"


def test_constant_and_cosine_schedules_warm_up_linearly():
    const = WarmupSchedule("constant", 64, warmup=10, total=100)
    cosine = WarmupSchedule("cosine", 64, warmup=10, total=100)
    assert const(4) == cosine(4) == 0.5
    assert const(50) == 1.0
    assert cosine(9) == 1.0 and cosine(99) == pytest.approx(0.0)


def test_configure_uses_the_papers_adam_settings():
    model = torch.nn.Linear(2, 2)
    out = configure(OptimSpec(), model, d_model=512, total_steps=10)
    group = out["optimizer"].param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-9
    assert out["lr_scheduler"]["interval"] == "step"


def test_unknown_optimizer_or_schedule_is_rejected():
    with pytest.raises(ConfigError, match="optim.name"):
        OptimSpec(name="sgd")
    with pytest.raises(ConfigError, match="optim.schedule"):
        OptimSpec(schedule="step")


@pytest.mark.parametrize("total", [40, 250, 950])
@pytest.mark.parametrize("kind", ["linear", "cosine", "wsd"])
def test_a_schedule_planned_for_a_step_count_warms_up_then_ends_at_zero_there(total, kind):
    spec = OptimSpec(schedule=kind, warmup_steps=400, warmup_fraction=0.1, cooldown=0.2)
    schedule = WarmupSchedule(kind, 64, warmup=400, total=10_000)
    schedule.plan(spec, total)
    warmup = round(0.1 * total)  # capped by the fraction, below warmup_steps
    assert schedule.warmup == warmup
    rates = [schedule(step) for step in range(total)]
    assert rates[warmup - 1] == 1.0 and rates[0] == pytest.approx(1 / warmup)  # the peak ends the warm-up
    assert all(a < b for a, b in itertools.pairwise(rates[:warmup]))
    assert rates[-1] == 0.0 and all(r > 0 for r in rates[:-1])  # zero at the planned last step, not before
    assert all(a >= b for a, b in itertools.pairwise(rates[warmup - 1 :]))  # no rise after the peak
    if kind == "wsd":  # constant until the cooldown, the last fifth of the steps
        assert rates[int(0.8 * total) - 1] == 1.0 and rates[int(0.8 * total) + 1] < 1.0
    assert warmup_for(OptimSpec(warmup_steps=20, warmup_fraction=0.1), total) == min(20, warmup)  # either caps it


def test_the_budget_plans_the_steps_its_time_allows_after_scoring_and_validations():
    costs = Costs(budget=1800, elapsed=60, done=25, step=3.0, val_batch=2.0, val_batches=14, test_batches=14,
                  steps_per_validation=None, candidates=2)
    total, reserve = plan_steps(costs)
    assert reserve == 2 * (14 + 14) * 2.0  # every candidate validated and tested
    assert total == 25 + int((1800 - 60 - 112) / 3.0)
    with_validations = plan_steps(dataclasses.replace(costs, steps_per_validation=100))[0]
    inside = (with_validations - 1) // 100  # each validation before the end costs 14 batches of 2 s
    assert with_validations == 25 + int((1800 - 60 - 112 - inside * 28) / 3.0) < total
    later = dataclasses.replace(costs, done=250, elapsed=800, steps_per_validation=100)  # validated at 100 and 200
    to_come = (plan_steps(later)[0] - 1) // 100 - 2  # those already done are in the elapsed time
    assert to_come > 0 and plan_steps(later)[0] == 250 + int((1800 - 800 - 112 - to_come * 28) / 3.0)
    # 170 s: time for 56 more steps, but not for the validation at step 300 (28 s) and a step after it: the run ends
    # on that validation, which scores its final weights
    edge = dataclasses.replace(later, elapsed=1800 - 112 - 170, steps_per_validation=300)
    assert plan_steps(edge)[0] == 300
    assert plan_steps(dataclasses.replace(edge, steps_per_validation=None))[0] == 306
    unmeasured = plan_steps(dataclasses.replace(costs, val_batch=None))
    assert unmeasured == (25 + int((1800 - 60 - 180) / 3.0), 180.0)  # a tenth of the budget kept
    assert plan_steps(dataclasses.replace(costs, elapsed=1799))[0] == 26  # over budget already: one more step
