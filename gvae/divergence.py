"""Finding the first training iteration whose losses are not finite, without a host sync a step.

Asking whether a CUDA tensor is finite turns it into a Python bool: the host waits for the GPU,
and the queue of kernels the host had launched ahead runs dry. The watch instead copies each
step's losses into a buffer on the device and looks at the buffer every `interval` steps (and
whenever the trainer asks, before each evaluation). What it reports is unchanged: the first
iteration with a non-finite loss, and that iteration's losses.
"""

from __future__ import annotations

import torch

# Steps between looks on CUDA: a sync every 256 steps leaves the launch queue full nearly always,
# and a diverged trial trains on for at most that many steps before it stops.
CUDA_INTERVAL = 256


class Diverged(Exception):
    """A loss became NaN or infinite; the trial cannot continue."""

    def __init__(self, iteration: int, losses: dict[str, float]) -> None:
        super().__init__(f"losses not finite at iteration {iteration}: {losses}")
        self.iteration = iteration
        self.losses = losses


class DivergenceWatch:
    """Collects each step's losses and raises Diverged for the first non-finite one."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.names: list[str] = []
        self.buffer: torch.Tensor | None = None
        self.first_iteration = 0
        self.count = 0

    @classmethod
    def for_device(cls, device: torch.device) -> DivergenceWatch:
        """Every step on the CPU, where looking costs nothing and a diverged trial stops at once;
        every CUDA_INTERVAL steps on a GPU."""
        return cls(CUDA_INTERVAL if device.type == "cuda" else 1)

    def record(self, iteration: int, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([value.detach().float() for value in losses.values()])
        if self.buffer is None:
            self.names = list(losses)
            self.buffer = values.new_empty(self.interval, len(values))
        if self.count == 0:
            self.first_iteration = iteration
        self.buffer[self.count] = values  # a copy on the device: no sync
        self.count += 1
        if self.count == self.interval:
            self.check()

    def check(self) -> None:
        """Raise Diverged if any step recorded since the last check had a non-finite loss."""
        if self.buffer is None or self.count == 0:
            return
        window = self.buffer[: self.count]
        self.count = 0
        finite = torch.isfinite(window).all(dim=1)
        if bool(finite.all()):  # the one sync per window
            return
        first = int((~finite).nonzero()[0, 0])
        losses = dict(zip(self.names, window[first].tolist(), strict=True))
        raise Diverged(self.first_iteration + first, losses)
