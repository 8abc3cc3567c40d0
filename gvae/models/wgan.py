"""WGAN (Arjovsky et al. 2017): weight-clipped critic trained n_critic times per generator step."""

from __future__ import annotations

import torch

from gvae.losses import wgan_critic_loss, wgan_generator_loss
from gvae.models.base import BatchSource, GenerativeModel, Losses, frozen, step
from gvae.nets import Architecture, ImageShape


class WGAN(GenerativeModel):
    def build(self, arch: Architecture, image_shape: ImageShape) -> None:
        self.generator = arch.generator(self.latent_dim, image_shape)
        self.critic = arch.discriminator(image_shape)
        self.nets = {"generator": self.generator, "critic": self.critic}
        # RMSprop rather than a momentum method: WGAN training is unstable with momentum.
        self.optimizers = {
            "generator": self.rmsprop(self.generator),
            "critic": self.rmsprop(self.critic),
        }

    def train_step(self, next_batch: BatchSource) -> Losses:
        for _ in range(self.config.n_critic):
            real = next_batch()
            with torch.no_grad():
                fake = self.generator(self.noise(real.shape[self.batch_dim]))
            critic_loss = self.loss(wgan_critic_loss, *self.judge(self.critic, real, fake))
            step(self.optimizers["critic"], critic_loss)
            self._clip_critic()
        fake = self.generator(self.noise(real.shape[self.batch_dim]))
        with frozen(self.critic):
            g_loss = self.loss(wgan_generator_loss, self.critic(fake))
        step(self.optimizers["generator"], g_loss)
        # The negated critic loss estimates the Wasserstein distance.
        return {"critic_loss": critic_loss.detach(), "g_loss": g_loss.detach()}

    @torch.no_grad()
    def _clip_critic(self) -> None:
        for parameter in self.critic.parameters():
            parameter.clamp_(-self.config.clip, self.config.clip)
