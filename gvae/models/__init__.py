"""Model registry: adding a model family is one module and one line here."""

from __future__ import annotations

from gvae.models.base import GenerativeModel
from gvae.models.gan import GAN
from gvae.models.vae import VAE
from gvae.models.vaegan import VAEGAN, ConstrainedVAEGAN
from gvae.models.wgan import WGAN

MODELS: dict[str, type[GenerativeModel]] = {
    "gan": GAN,
    "wgan": WGAN,
    "vae": VAE,
    "vaegan": VAEGAN,
    "cvaegan": ConstrainedVAEGAN,
}

__all__ = ["MODELS", "GenerativeModel"]
