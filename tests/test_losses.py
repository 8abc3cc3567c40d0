"""Losses against values computed by hand on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from gvae.losses import (
    constrained_gan_term,
    gan_discriminator_loss,
    gan_generator_loss,
    kl_to_standard_normal,
    reconstruction_loss_from_logits,
    wgan_critic_loss,
    wgan_generator_loss,
)


def test_gan_losses_at_zero_logits_are_log_two():
    zeros = torch.zeros(4, 1)
    assert gan_discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert gan_generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert gan_generator_loss(zeros, "minimax").item() == pytest.approx(-math.log(2))


def test_generator_losses_match_their_formulas():
    logits = torch.tensor([[-2.0], [0.5], [3.0]])
    d_fake = torch.sigmoid(logits)
    assert gan_generator_loss(logits).item() == pytest.approx(-torch.log(d_fake).mean().item())
    minimax = torch.log(1 - d_fake).mean().item()
    assert gan_generator_loss(logits, "minimax").item() == pytest.approx(minimax, rel=1e-5)


def test_wgan_losses():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -0.5])
    assert wgan_critic_loss(real, fake).item() == pytest.approx(0.0 - 2.0)
    assert wgan_generator_loss(fake).item() == pytest.approx(0.0)


def test_kl_is_zero_for_the_prior_and_known_otherwise():
    assert kl_to_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)).item() == 0.0
    # KL(N(1, 1) || N(0, 1)) = 0.5 per dimension.
    assert kl_to_standard_normal(torch.ones(2, 4), torch.zeros(2, 4)).item() == pytest.approx(2.0)


def test_reconstruction_loss_sums_pixels_and_averages_batch():
    # Logit 0 -> p = 0.5: ln 2 per pixel whatever the target; 2 pixels per image, mean over 2.
    images = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    logits = torch.zeros_like(images)
    assert reconstruction_loss_from_logits(logits, images).item() == pytest.approx(2 * math.log(2))


def test_reconstruction_loss_is_the_bernoulli_negative_log_likelihood():
    # Pixel 1: target 1, logit 0 -> p = 0.5, -log 0.5 = ln 2. Pixel 2: target 0, logit ln 3 ->
    # p = 3/4, -log(1 - 3/4) = ln 4. One image: ln 2 + ln 4 = ln 8.
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])
    images = torch.tensor([[[[1.0, 0.0]]]])
    assert reconstruction_loss_from_logits(logits, images).item() == pytest.approx(math.log(8))
    # Soft targets too: -(t log p + (1 - t) log(1 - p)) summed over pixels, mean over the batch.
    mixed = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    p = torch.sigmoid(mixed.double())
    by_hand = -(targets * p.log() + (1 - targets) * (1 - p).log()).flatten(1).sum(1).mean()
    assert reconstruction_loss_from_logits(mixed, targets).item() == pytest.approx(
        by_hand.item(), rel=1e-5
    )
    # A diverged decoder's NaN must reach the trainer as a NaN loss, not an exception.
    assert reconstruction_loss_from_logits(torch.full((1, 2), math.nan), images[0, 0]).isnan()


def test_reconstruction_loss_from_logits_has_pytorchs_gradient_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1, 28, 28, generator=generator) * 12  # saturated pixels included
    images = torch.rand(64, 1, 28, 28, generator=generator).round()
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    loss = reconstruction_loss_from_logits(ours, images)
    reference = F.binary_cross_entropy_with_logits(theirs, images, reduction="sum") / 64
    loss.backward()
    reference.backward()
    assert torch.equal(ours.grad, theirs.grad)
    # Within 1.2e-7 per pixel of an image, plus the rounding of a float32 sum of this size,
    # whose order varies with the threads and vector width (one ulp of 3786 is 2.4e-4).
    rounding = 4 * torch.finfo(torch.float32).eps * abs(reference.item())
    assert loss.item() == pytest.approx(reference.item(), abs=1.2e-7 * images[0].numel() + rounding)


@pytest.mark.parametrize(
    "gan_loss,lam,d,expected_grad", [(0.3, 2.0, 0.5, 0.0), (0.8, 2.0, 0.5, 2.0)]
)
def test_hinge_passes_no_gradient_below_d_and_lambda_above(gan_loss, lam, d, expected_grad):
    value = torch.tensor(gan_loss, requires_grad=True)
    term = constrained_gan_term(value, lam, d)
    term.backward()
    assert term.item() == pytest.approx(lam * max(gan_loss - d, 0.0))
    assert value.grad.item() == pytest.approx(expected_grad)


def test_hinge_with_lambda_one_and_d_zero_is_the_plain_nonnegative_gan_loss():
    value = gan_generator_loss(torch.randn(16, 1, generator=torch.Generator().manual_seed(0)))
    assert constrained_gan_term(value, 1.0, 0.0).item() == value.item()
