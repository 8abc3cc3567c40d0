"""GAN (Goodfellow et al. 2014) with the non-saturating generator loss by default (paper Eq. 2)."""

from __future__ import annotations

from gvae.losses import gan_discriminator_loss, gan_generator_loss
from gvae.models.base import BatchSource, GenerativeModel, Losses, frozen, step
from gvae.nets import Architecture, ImageShape


class GAN(GenerativeModel):
    def build(self, arch: Architecture, image_shape: ImageShape) -> None:
        self.generator = arch.generator(self.latent_dim, image_shape)
        self.discriminator = arch.discriminator(image_shape)
        self.nets = {"generator": self.generator, "discriminator": self.discriminator}
        self.optimizers = {
            "generator": self.adam(self.generator),
            "discriminator": self.adam(self.discriminator),
        }

    def train_step(self, next_batch: BatchSource) -> Losses:
        real = next_batch()
        fake = self.generator(self.noise(real.shape[self.batch_dim]))
        d_loss = self.loss(
            gan_discriminator_loss, *self.judge(self.discriminator, real, fake.detach())
        )
        step(self.optimizers["discriminator"], d_loss)
        with frozen(self.discriminator):
            g_loss = self.loss(
                gan_generator_loss, self.discriminator(fake), form=self.config.gan_loss
            )
        step(self.optimizers["generator"], g_loss)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}
