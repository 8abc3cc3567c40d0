"""TrialConfig: the one description of a trial, shared by the CLI, the study driver and the trainer.

Its fields are the columns of the trials table. Validate once at the edge (`validate`); inner code
trusts a validated config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from gvae.errors import GvaeError
from gvae.names import DATASET_NAMES

MODEL_NAMES = ("gan", "wgan", "vae", "vaegan", "cvaegan")
ARCH_NAMES = ("mlp", "conv")
GAN_LOSSES = ("nonsaturating", "minimax")
GRAPH_MODES = ("off", "on", "auto")  # the training step as a CUDA graph (gvae.graphs)

# Upper bounds of the counts a trial is given (README, Studies): past them a trial cannot finish
# (the paper trains 10**6 iterations), an evaluation cannot hold its samples, or a seed leaves the
# 32 bits that gvae.data.batches can shift into its 64-bit generator seeds.
LIMITS = {
    "iterations": (10**9, "iterations a trial may train"),
    "eval_every": (10**9, "iterations between evaluations"),
    "eval_samples": (10**6, "samples an evaluation may generate"),
    "batch_size": (10**8, "images a batch may hold"),  # 300 GB of 28x28 floats
    "n_critic": (1000, "critic steps per iteration"),
    "seed": (2**32 - 1, "(seeds are 32-bit numbers)"),
    "cpu_threads": (1024, "CPU threads a trial may use"),
}

# Per-model learning rates: Adam 2e-4 (DCGAN, Larsen); RMSprop 5e-5 for WGAN (Arjovsky et al.).
DEFAULT_LR = {"gan": 2e-4, "wgan": 5e-5, "vae": 1e-3, "vaegan": 2e-4, "cvaegan": 2e-4}


@dataclass(frozen=True)
class TrialConfig:
    """One trial. `lam` and `d` are the paper's λ and d of L_vae + λ·max(L_gan − d, 0)."""

    model: str = "cvaegan"
    dataset: str = "mnist5k"
    arch: str = "mlp"
    lam: float = 1.0
    d: float = 0.0
    lr: float | None = None  # None: the model's default (DEFAULT_LR)
    seed: int = 0
    iterations: int = 2000
    batch_size: int = 64
    eval_every: int = 500
    eval_samples: int = 10_000
    latent_dim: int = 100
    gan_loss: str = "nonsaturating"  # generator loss of GAN-type models: paper Eq. 2 or Eq. 1
    n_critic: int = 5  # WGAN critic steps per generator step
    clip: float = 0.01  # WGAN weight clipping
    data_root: str = "data"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch's CPU threads. 0: one for a trial on a GPU, whose CPU only launches kernels; on the
    # CPU, as many as the process has (under Ray, the trial's CPUs).
    cpu_threads: int = 0
    # The step as a replayed CUDA graph: off, on (or an error), auto (on a GPU when it can be).
    graph: str = "off"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.model]

    def resolved(self) -> TrialConfig:
        """The same config with every default made explicit (what gets recorded)."""
        return dataclasses.replace(self, lr=self.learning_rate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        """Build from a mapping, rejecting unknown keys with a one-line error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GvaeError(
                f"{unknown[0]}: unknown trial parameter; use one of {', '.join(sorted(known))}"
            )
        return cls(**data)

    def validate(self) -> TrialConfig:
        """Raise GvaeError naming the first bad field and the fix; return self when valid."""
        for check in _CHECKS:
            check(self)
        return self


def _choice(name: str, allowed: tuple[str, ...]):
    def check(config: TrialConfig) -> None:
        value = getattr(config, name)
        if value not in allowed:
            raise GvaeError(f"{name}: unknown value {value!r}; use one of {', '.join(allowed)}")

    return check


def _number(name: str, minimum: float, strict: bool, kind: type = float):
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"

    def check(config: TrialConfig) -> None:
        value = getattr(config, name)
        if value is None and name == "lr":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise GvaeError(f"{name}: expected {kind.__name__}, got {value!r}")
        too_small = value < minimum or (strict and value == minimum)
        if kind is float:  # inf and nan too: they turn every loss non-finite
            if too_small or not math.isfinite(value):
                raise GvaeError(
                    f"{name}: must be a finite number {bound} (got {value!r}); "
                    f"pass a finite number {bound}"
                )
            return
        maximum, what = LIMITS.get(name, (None, ""))
        fix = f"from {minimum + 1 if strict else minimum} to {maximum}" if maximum else bound
        if too_small:
            raise GvaeError(f"{name}: must be {bound} (got {value!r}); pass a value {fix}")
        if maximum is not None and value > maximum:
            raise GvaeError(
                f"{name}: {value} is more than the limit of {maximum} {what}; pass a value {fix}"
            )

    return check


def _dataset_known(config: TrialConfig) -> None:
    if config.dataset not in DATASET_NAMES:
        raise GvaeError(
            f"dataset: unknown dataset {config.dataset!r}; use one of {', '.join(DATASET_NAMES)}"
        )


def _eval_every_fits(config: TrialConfig) -> None:
    if config.eval_every > config.iterations:
        raise GvaeError(
            f"eval_every: {config.eval_every} is more than iterations ({config.iterations}); "
            "pass an eval_every <= iterations"
        )


def _device_known(config: TrialConfig) -> None:
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise GvaeError(f"device: unknown device {config.device!r}; use auto, cpu, cuda or cuda:N")


def _graph_on_a_gpu(config: TrialConfig) -> None:
    if config.graph == "on" and config.device == "cpu":
        raise GvaeError(
            "graph: on needs a CUDA device, and device is cpu; set device: cuda, or graph: off"
        )


_CHECKS = (
    _choice("model", MODEL_NAMES),
    _choice("arch", ARCH_NAMES),
    _choice("gan_loss", GAN_LOSSES),
    _choice("graph", GRAPH_MODES),
    _dataset_known,
    _number("lam", 0, strict=False),
    _number("d", 0, strict=False),
    _number("lr", 0, strict=True),
    _number("seed", 0, strict=False, kind=int),
    _number("iterations", 0, strict=True, kind=int),
    _number("batch_size", 0, strict=True, kind=int),
    _number("eval_every", 0, strict=True, kind=int),
    _number("eval_samples", 0, strict=True, kind=int),
    _number("latent_dim", 0, strict=True, kind=int),
    _number("n_critic", 0, strict=True, kind=int),
    _number("clip", 0, strict=True),
    _number("cpu_threads", 0, strict=False, kind=int),
    _eval_every_fits,
    _device_known,
    _graph_on_a_gpu,
)
