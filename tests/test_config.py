"""Trial config validation: every bad field gets a one-line error that names it."""

import subprocess
import sys

import pytest

from gvae.config import DEFAULT_LR, TrialConfig
from gvae.errors import GvaeError

BAD_FIELDS = [
    ({"model": "gann"}, "model"),
    ({"dataset": "cifar"}, "dataset"),
    ({"arch": "transformer"}, "arch"),
    ({"lam": -1.0}, "lam"),
    ({"d": -0.1}, "d"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"iterations": 0}, "iterations"),
    ({"batch_size": 0}, "batch_size"),
    ({"eval_every": 0}, "eval_every"),
    ({"iterations": 10, "eval_every": 20}, "eval_every"),
    ({"gan_loss": "hinge"}, "gan_loss"),
    ({"seed": 1.5}, "seed"),
    ({"lam": float("nan")}, "lam"),
    ({"device": "tpu"}, "device"),
    ({"iterations": 10**13}, "iterations"),
    ({"iterations": 10**10, "eval_every": 10**10}, "iterations"),
    ({"eval_samples": 10**7}, "eval_samples"),
    ({"batch_size": 10**8 + 1}, "batch_size"),
    ({"n_critic": 1001}, "n_critic"),
    ({"seed": 2**32}, "seed"),
    ({"lr": float("inf")}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"clip": float("inf")}, "clip"),
    ({"d": float("-inf")}, "d"),
    ({"cpu_threads": -1}, "cpu_threads"),
    ({"cpu_threads": 1.5}, "cpu_threads"),
    ({"cpu_threads": 1025}, "cpu_threads"),
]


@pytest.mark.parametrize("overrides,field", BAD_FIELDS)
def test_bad_field_is_named(overrides, field):
    with pytest.raises(GvaeError) as error:
        TrialConfig(**overrides).validate()
    message = str(error.value)
    assert message.startswith(f"{field}:")
    assert "\n" not in message


def test_counts_have_a_named_upper_bound_and_floats_must_be_finite():
    # 10**13 iterations would train until killed: the limit is in the message, and is allowed.
    with pytest.raises(GvaeError) as error:
        TrialConfig(iterations=10**13).validate()
    assert str(error.value) == (
        "iterations: 10000000000000 is more than the limit of 1000000000 iterations a trial may "
        "train; pass a value from 1 to 1000000000"
    )
    TrialConfig(iterations=10**9, eval_every=10**9, eval_samples=10**6, batch_size=10**8).validate()
    TrialConfig(n_critic=1000, seed=2**32 - 1).validate()
    for field, value in [("lr", float("inf")), ("clip", float("nan"))]:
        with pytest.raises(GvaeError) as error:
            TrialConfig(**{field: value}).validate()
        assert str(error.value) == (
            f"{field}: must be a finite number > 0 (got {value!r}); pass a finite number > 0"
        )
    with pytest.raises(GvaeError, match=r"^lam: must be a finite number >= 0 \(got inf\)"):
        TrialConfig(lam=float("inf")).validate()


def test_unknown_key_is_rejected():
    with pytest.raises(GvaeError, match="^lamda: unknown trial parameter"):
        TrialConfig.from_dict({"lamda": 1.0})


def test_defaults_validate_and_resolve_the_model_learning_rate():
    config = TrialConfig(model="wgan").validate()
    assert config.resolved().lr == DEFAULT_LR["wgan"] == 5e-5
    assert TrialConfig(model="gan", lr=1e-3).resolved().lr == 1e-3


def test_round_trip_through_a_dict():
    config = TrialConfig(model="gan", lam=0.5, d=0.2, seed=3)
    assert TrialConfig.from_dict(config.to_dict()) == config


def test_the_config_and_the_name_lists_import_no_torch():
    # A study file is validated (config, spec, names) before gvae study run starts Ray and torch.
    code = "import gvae.config, gvae.names, gvae.study.spec, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
