"""Every model family: shapes, finite losses, and the cvaegan/vaegan identity."""

import pytest
import torch

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.models import MODELS
from gvae.trainer import BatchSampler

SHAPE = (1, 28, 28)


def make(model: str, **overrides) -> object:
    torch.manual_seed(0)
    config = TrialConfig(model=model, batch_size=8, **overrides).validate()
    return MODELS[model](config, SHAPE, torch.device("cpu"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_step_and_sample_shapes(name):
    model = make(name)
    batches = BatchSampler(torch.rand(32, *SHAPE), batch_size=8, seed=0)
    losses = model.train_step(batches)
    assert losses and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    images = model.sample(torch.randn(5, 100))
    assert images.shape == (5, *SHAPE)
    assert images.min() >= 0 and images.max() <= 1


def test_paper_mlp_widths():
    gan = make("gan")
    gen_widths = [m.out_features for m in gan.generator if isinstance(m, torch.nn.Linear)]
    disc_widths = [m.out_features for m in gan.discriminator if isinstance(m, torch.nn.Linear)]
    assert gen_widths == [98, 196, 392, 784]
    assert disc_widths == [392, 196, 98, 1]
    vae = make("vae")
    assert vae.encoder.mean.out_features == vae.encoder.log_var.out_features == 100


def test_state_round_trip_restores_every_net_and_optimizer():
    model = make("vaegan")
    model.train_step(BatchSampler(torch.rand(32, *SHAPE), 8, 0))
    copy = make("vaegan", seed=1)
    copy.load_state_dict(model.state_dict())
    z = torch.randn(4, 100)
    assert torch.equal(model.sample(z), copy.sample(z))
    saved = model.optimizers["vae"].state_dict()["state"][0]["exp_avg"]
    assert torch.equal(copy.optimizers["vae"].state_dict()["state"][0]["exp_avg"], saved)


def test_wgan_clips_critic_weights():
    model = make("wgan", clip=0.01)
    model.train_step(BatchSampler(torch.rand(64, *SHAPE), 8, 0))
    assert max(p.abs().max().item() for p in model.critic.parameters()) <= 0.01


def _train(name: str, steps: int, **overrides) -> list[dict]:
    model = make(name, **overrides)
    batches = BatchSampler(torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(1)), 8, 0)
    return [{k: v.item() for k, v in model.train_step(batches).items()} for _ in range(steps)]


def _hinge(steps: list[dict]) -> tuple[list[dict], list[float]]:
    """The losses without cvaegan's `constraint_active`, and that flag per step."""
    flags = [step.pop("constraint_active") for step in steps]
    return steps, flags


def test_cvaegan_with_lambda_one_and_d_zero_equals_vaegan():
    losses, active = _hinge(_train("cvaegan", 5, lam=1.0, d=0.0))
    assert losses == _train("vaegan", 5)
    assert active == [1.0] * 5  # the non-saturating L_gan is always above 0


def test_cvaegan_with_a_large_margin_ignores_the_gan_term():
    # With d far above any GAN loss the hinge is flat: encoder/decoder see L_vae only, any λ.
    flat, active = _hinge(_train("cvaegan", 5, lam=5.0, d=1e6))
    assert flat == _hinge(_train("cvaegan", 5, lam=0.0, d=0.0))[0]
    assert active == [0.0] * 5
    pushing = _hinge(_train("cvaegan", 5, lam=5.0, d=0.0))[0]
    assert pushing != _hinge(_train("cvaegan", 5, lam=0.0, d=0.0))[0]
