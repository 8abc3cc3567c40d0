"""The divergence watch finds the first non-finite step, looking every step or once a window."""

import math

import pytest
import torch

from gvae.divergence import Diverged, DivergenceWatch


def steps(bad_at: int, count: int):
    for iteration in range(1, count + 1):
        loss = float("nan") if iteration >= bad_at else 1.0 / iteration
        yield iteration, {"d_loss": torch.tensor(loss), "g_loss": torch.tensor(2.0 * iteration)}


def first_divergence(interval: int, bad_at: int, count: int) -> Diverged | None:
    watch = DivergenceWatch(interval)
    try:
        for iteration, losses in steps(bad_at, count):
            watch.record(iteration, losses)
        watch.check()
    except Diverged as error:
        return error
    return None


@pytest.mark.parametrize("interval", [1, 4, 7, 256])
def test_the_first_non_finite_iteration_and_its_losses_are_reported(interval):
    error = first_divergence(interval, bad_at=11, count=30)
    assert error is not None and error.iteration == 11
    assert math.isnan(error.losses["d_loss"]) and error.losses["g_loss"] == 22.0


def test_a_window_checks_only_its_own_steps_and_finite_runs_pass():
    assert first_divergence(4, bad_at=100, count=30) is None
    watch = DivergenceWatch(4)
    for iteration, losses in steps(bad_at=100, count=6):
        watch.record(iteration, losses)
    watch.check()  # 5 and 6 finite; the buffer's stale rows 7 and 8 are not looked at
    watch.record(7, {"d_loss": torch.tensor(float("inf")), "g_loss": torch.tensor(0.0)})
    with pytest.raises(Diverged) as error:
        watch.check()
    assert error.value.iteration == 7 and error.value.losses["d_loss"] == math.inf


def test_steps_are_looked_at_without_waiting_on_the_cpu_and_per_window_on_cuda():
    assert DivergenceWatch.for_device(torch.device("cpu")).interval == 1
    assert DivergenceWatch.for_device(torch.device("cuda")).interval > 1
