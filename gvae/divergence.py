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
    """Collects each step's losses and finds each member's first non-finite step.

    Losses are scalars for a lone trial, or [K] for a pack's K members (gvae.pack), whose members
    diverge apart: a member's NaN stays in its own slice of every tensor.
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.names: list[str] = []
        self.buffer: torch.Tensor | None = None  # [interval, losses, members]
        self.first_iteration = 0
        self.count = 0
        self.diverged: set[int] = set()  # members already reported

    @classmethod
    def for_device(cls, device: torch.device) -> DivergenceWatch:
        """Every step on the CPU, where looking costs nothing and a diverged trial stops at once;
        every CUDA_INTERVAL steps on a GPU."""
        return cls(CUDA_INTERVAL if device.type == "cuda" else 1)

    def record(self, iteration: int, losses: dict[str, torch.Tensor]) -> dict[int, Diverged]:
        """Keep this step's losses; at the end of a window, the members newly diverged in it."""
        values = torch.stack([value.detach().float().reshape(-1) for value in losses.values()])
        if self.buffer is None:
            self.names = list(losses)
            self.buffer = values.new_empty(self.interval, *values.shape)
        if self.count == 0:
            self.first_iteration = iteration
        self.buffer[self.count] = values  # a copy on the device: no sync
        self.count += 1
        return self.check() if self.count == self.interval else {}

    def check(self) -> dict[int, Diverged]:
        """The members whose first non-finite loss came since the last check, by member."""
        if self.buffer is None or self.count == 0:
            return {}
        window = self.buffer[: self.count]
        self.count = 0
        finite = torch.isfinite(window).all(dim=1)  # [steps, members]
        if bool(finite.all()):  # the one sync per window
            return {}
        found: dict[int, Diverged] = {}
        for member in (~finite).any(dim=0).nonzero()[:, 0].tolist():
            if member in self.diverged:
                continue
            step = int((~finite[:, member]).nonzero()[0, 0])
            losses = dict(zip(self.names, window[step, :, member].tolist(), strict=True))
            found[member] = Diverged(self.first_iteration + step, losses)
        self.diverged.update(found)
        return found
