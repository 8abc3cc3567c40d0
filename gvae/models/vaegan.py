"""VAE-GAN (Larsen et al. 2015, paper Eq. 7) and the constrained VAE-GAN (the paper's proposal).

The discriminator learns to tell real images from both reconstructions and prior samples. The
encoder/decoder minimise L_vae + L_gan (VAE-GAN) or L_vae + λ·max(L_gan − d, 0) (constrained).
"""

from __future__ import annotations

import torch

from gvae.losses import (
    constrained_gan_term,
    gan_discriminator_loss,
    gan_generator_loss,
    kl_to_standard_normal,
    reconstruction_loss_from_logits,
    reparameterise,
)
from gvae.models.base import BatchSource, GenerativeModel, Losses, frozen, step
from gvae.nets import Architecture, ImageShape


class VAEGAN(GenerativeModel):
    def build(self, arch: Architecture, image_shape: ImageShape) -> None:
        self.encoder = arch.encoder(self.latent_dim, image_shape)
        self.generator = arch.generator(self.latent_dim, image_shape)  # the decoder
        self.discriminator = arch.discriminator(image_shape)
        self.nets = {
            "encoder": self.encoder,
            "decoder": self.generator,
            "discriminator": self.discriminator,
        }
        self.optimizers = {
            "vae": self.adam(self.encoder, self.generator),
            "discriminator": self.adam(self.discriminator),
        }

    def gan_term(self, gan_loss: torch.Tensor) -> torch.Tensor:
        """How the GAN loss enters the encoder/decoder loss: plainly, as in Eq. 7."""
        return gan_loss

    def train_step(self, next_batch: BatchSource) -> Losses:
        real = next_batch()
        mean, log_var = self.encoder(real)
        logits = self.decode_logits(reparameterise(mean, log_var, self.noise_like(mean)))
        reconstruction = torch.sigmoid(logits)
        prior_images = self.generator(self.noise(real.shape[self.batch_dim]))
        fakes = self.cat(reconstruction, prior_images)

        judged = self.judge(self.discriminator, real, fakes.detach())
        d_loss = self.loss(gan_discriminator_loss, *judged)
        step(self.optimizers["discriminator"], d_loss)

        recon_loss = self.loss(reconstruction_loss_from_logits, logits, real)
        kl_loss = self.loss(kl_to_standard_normal, mean, log_var)
        with frozen(self.discriminator):
            gan_loss = self.loss(
                gan_generator_loss, self.discriminator(fakes), form=self.config.gan_loss
            )
        step(self.optimizers["vae"], recon_loss + kl_loss + self.gan_term(gan_loss))
        return {
            "d_loss": d_loss.detach(),
            "recon_loss": recon_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "gan_loss": gan_loss.detach(),
        }


class ConstrainedVAEGAN(VAEGAN):
    """The GAN term only pushes while L_gan exceeds the margin d, weighted by λ."""

    def gan_term(self, gan_loss: torch.Tensor) -> torch.Tensor:
        return constrained_gan_term(gan_loss, self.config.lam, self.config.d)

    def train_step(self, next_batch: BatchSource) -> Losses:
        losses = super().train_step(next_batch)
        # 1 when the hinge passed gradient (L_gan > d) this step: the trainer averages it over the
        # steps between evaluations into the curves' `constraint_active` share.
        losses["constraint_active"] = (losses["gan_loss"] > self.config.d).float()
        return losses
