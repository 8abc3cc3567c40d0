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
    found: dict[int, Diverged] = {}
    for iteration, losses in steps(bad_at, count):
        found.update(watch.record(iteration, losses))
    found.update(watch.check())
    assert set(found) <= {0}  # a lone trial is member 0
    return found.get(0)


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
    assert watch.check() == {}  # 5 and 6 finite; the buffer's stale rows 7 and 8 not looked at
    watch.record(7, {"d_loss": torch.tensor(float("inf")), "g_loss": torch.tensor(0.0)})
    error = watch.check()[0]
    assert error.iteration == 7 and error.losses["d_loss"] == math.inf


def test_each_member_of_a_pack_is_reported_once_at_its_own_first_non_finite_step():
    watch = DivergenceWatch(4)
    nan = float("nan")
    # iteration: (d_loss of members 0, 1, 2); member 1 turns NaN at 3, member 2 at 6
    table = {
        1: (1, 1, 1),
        2: (1, 2, 1),
        3: (1, nan, 1),
        4: (1, nan, 1),
        5: (1, nan, 1),
        6: (1, nan, nan),
        7: (1, nan, nan),
    }
    found: dict[int, Diverged] = {}
    for iteration, values in table.items():
        losses = {"d_loss": torch.tensor(values, dtype=torch.float), "g_loss": torch.zeros(3)}
        new = watch.record(iteration, losses)
        assert not set(new) & set(found)  # never reported twice
        found.update(new)
    found.update(watch.check())
    assert sorted(found) == [1, 2]
    assert found[1].iteration == 3 and found[2].iteration == 6
    assert found[2].losses == {"d_loss": pytest.approx(nan, nan_ok=True), "g_loss": 0.0}


def test_steps_are_looked_at_without_waiting_on_the_cpu_and_per_window_on_cuda():
    assert DivergenceWatch.for_device(torch.device("cpu")).interval == 1
    assert DivergenceWatch.for_device(torch.device("cuda")).interval > 1
