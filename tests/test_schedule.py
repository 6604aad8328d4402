import math

import pytest
import torch

from seq2seq.errors import ConfigError
from seq2seq.schedule import OptimSpec, WarmupSchedule, configure


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
        OptimSpec(schedule="linear")
