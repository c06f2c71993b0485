"""Learning-rate schedule vs closed-form values at chosen iterations."""
import math

import pytest
import torch

from util.lr_sched import WarmupCosine, scaled_lr

SCHEDULE = WarmupCosine(epochs=90, warmup_epochs=10, min_lr=0.01)


def _optimizer(*peaks):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in peaks]
    return torch.optim.SGD([{"params": [p], "peak_lr": peak} for p, peak in zip(params, peaks)], lr=123.0)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),                                   # warmup start
    (5.0, 0.2),                                   # mid-warmup: half of lr
    (2.5, 0.1),                                   # an iteration inside an epoch (per-iteration warmup)
    (10.0, 0.4),                                  # end of warmup: full lr
    (50.0, 0.01 + 0.39 * 0.5),                    # middle of the cosine: halfway between lr and min_lr
    (30.0, 0.01 + 0.39 * 0.5 * (1 + math.cos(math.pi / 4))),
    (90.0, 0.01),                                 # end: min_lr
])
def test_schedule_values(epoch, expected):
    assert SCHEDULE.lr(epoch, 0.4) == pytest.approx(expected, abs=1e-12)
    opt = _optimizer(0.4, 0.1)
    SCHEDULE.apply(opt, epoch)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
    # every group follows its own peak and ends at the same absolute min_lr
    other = 0.1 * epoch / 10 if epoch < 10 else 0.01 + (0.1 - 0.01) * (expected - 0.01) / 0.39
    assert opt.param_groups[1]["lr"] == pytest.approx(other, abs=1e-12)


def test_no_warmup_and_all_warmup_do_not_divide_by_zero():
    assert WarmupCosine(epochs=5, warmup_epochs=0).lr(0.0, 1.0) == pytest.approx(1.0)
    assert WarmupCosine(epochs=1, warmup_epochs=1).lr(0.5, 1.0) == pytest.approx(0.5)


def test_scaled_lr():
    # the paper's command: blr 0.1, batch 2048, accum 2, 4 GPUs -> 0.1 * 16384 / 256
    assert scaled_lr(0.1, 2048, 2, 4) == pytest.approx(6.4)
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
