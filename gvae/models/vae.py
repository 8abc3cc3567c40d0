"""VAE (Kingma and Welling 2014): the negative ELBO of paper Eq. 6, reparameterised."""

from __future__ import annotations

from gvae.losses import kl_to_standard_normal, reconstruction_loss_from_logits, reparameterise
from gvae.models.base import BatchSource, GenerativeModel, Losses, step
from gvae.nets import Architecture, ImageShape


class VAE(GenerativeModel):
    def build(self, arch: Architecture, image_shape: ImageShape) -> None:
        self.encoder = arch.encoder(self.latent_dim, image_shape)
        self.generator = arch.generator(self.latent_dim, image_shape)  # the decoder
        self.nets = {"encoder": self.encoder, "decoder": self.generator}
        self.optimizers = {"vae": self.adam(self.encoder, self.generator)}

    def train_step(self, next_batch: BatchSource) -> Losses:
        real = next_batch()
        mean, log_var = self.encoder(real)
        logits = self.decode_logits(reparameterise(mean, log_var, self.noise_like(mean)))
        recon_loss = self.loss(reconstruction_loss_from_logits, logits, real)
        kl_loss = self.loss(kl_to_standard_normal, mean, log_var)
        step(self.optimizers["vae"], recon_loss + kl_loss)
        return {"recon_loss": recon_loss.detach(), "kl_loss": kl_loss.detach()}
