"""The interface every model family implements: a train step, sampling, and state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from gvae.config import TrialConfig
from gvae.nets import Architecture, ImageShape, architecture
from gvae.pack import load_member, member_noise, stacked, unstacked

BatchSource = Callable[[], torch.Tensor]
Losses = dict[str, torch.Tensor]
# Layers whose output for one image depends on the rest of its batch (in training).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Devices with a fused Adam kernel (CUDA since torch 2.0, CPU since 2.4); a config's device is one
# of these, so the multi-tensor fallback serves only a device added later.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


class GenerativeModel:
    """The nets and optimisers of one model family; subclasses define `build` and `train_step`.

    One call of `train_step` is one training iteration (for WGAN: n_critic critic steps and one
    generator step). `generator` maps latent codes to images in [0, 1].

    With `members` > 0 the model is a pack (gvae.pack): every net has a leading member axis,
    batches are [K, B, ...], and the losses of a step are [K], one per member. Subclasses write
    their step once for both forms through `noise`, `noise_like`, `loss`, `judge` and `cat`.
    """

    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    generator: nn.Module

    def __init__(
        self,
        config: TrialConfig,
        image_shape: ImageShape,
        device: torch.device,
        members: int = 0,
    ) -> None:
        self.config = config
        self.device = device
        self.latent_dim = config.latent_dim
        self.members = members
        self.batch_dim = 1 if members else 0
        self.member_generators: list[torch.Generator] = []  # a pack's random streams
        self.nets = {}
        self.optimizers = {}
        self.build(_stacked_architecture(architecture(config.arch), members), image_shape)
        for net in self.nets.values():
            net.to(device)

    def build(self, arch: Architecture, image_shape: ImageShape) -> None:
        raise NotImplementedError

    def train_step(self, next_batch: BatchSource) -> Losses:
        raise NotImplementedError

    def adam(self, *nets: nn.Module) -> torch.optim.Adam:
        # β1 = 0.5 as in DCGAN and Larsen et al.: the usual choice for adversarial training.
        params = [p for net in nets for p in net.parameters()]
        return torch.optim.Adam(
            params, lr=self.config.learning_rate, betas=(0.5, 0.999), **fast_kernels(self.device)
        )

    def rmsprop(self, net: nn.Module) -> torch.optim.RMSprop:
        # RMSprop has no fused kernel; foreach updates all tensors in a few kernel launches.
        return torch.optim.RMSprop(net.parameters(), lr=self.config.learning_rate, foreach=True)

    def judge(self, critic: nn.Module, *batches: torch.Tensor) -> list[torch.Tensor]:
        """The critic's (discriminator's) outputs for several batches, in one pass when it keeps
        no batch statistics (the MLP): fewer, larger matmuls, and no gradient sums across passes.
        Apart otherwise: batch norm would mix the statistics of real and generated images."""
        if any(isinstance(m, BATCH_NORMS) for m in critic.modules()):
            return [critic(batch) for batch in batches]
        sizes = [batch.shape[self.batch_dim] for batch in batches]
        return list(critic(self.cat(*batches)).split(sizes, dim=self.batch_dim))

    def cat(self, *batches: torch.Tensor) -> torch.Tensor:
        """The batches as one, along the batch axis (behind the member axis of a pack)."""
        return torch.cat(batches, dim=self.batch_dim)

    def loss(self, function: Callable[..., torch.Tensor], *tensors: torch.Tensor, **options):
        """`function(*tensors)`: a scalar, or for a pack one value per member ([K])."""
        if not self.members:
            return function(*tensors, **options)
        return torch.vmap(lambda *member: function(*member, **options))(*tensors)

    def decode_logits(self, latent: torch.Tensor) -> torch.Tensor:
        """The generator's output before its final sigmoid: the decoder's logits per pixel."""
        out = latent
        for module in self.generator:  # every family's generator: a Sequential ending in Sigmoid
            if not isinstance(module, nn.Sigmoid):
                out = module(out)
        return out

    def noise(self, count: int) -> torch.Tensor:
        """Latent codes [count, latent] (a pack: [K, count, latent], each from its member's
        stream)."""
        if self.members:
            return member_noise(self.member_generators, count, self.latent_dim, self.device)
        return torch.randn(count, self.latent_dim, device=self.device)

    def noise_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of the tensor's shape, from the trial's (members') stream."""
        if self.members:
            return member_noise(self.member_generators, *tensor.shape[1:], self.device)
        return torch.randn_like(tensor)

    def member_sampler(self, member: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """`sample` for one member of a pack, through its generator alone: evaluating a pack
        needs one member's images at a time, not the whole pack's."""
        generator = unstacked(self.generator, member)

        @torch.no_grad()
        def sample(latent: torch.Tensor) -> torch.Tensor:
            return generator(latent.to(self.device))

        return sample

    @torch.no_grad()
    def sample(self, latent: torch.Tensor) -> torch.Tensor:
        """Images for the given latent codes, generated in eval mode (batch norm uses its stats)."""
        self.generator.eval()
        try:
            return self.generator(latent.to(self.device))
        finally:
            self.generator.train()

    def state_dict(self) -> dict:
        return {
            "nets": {name: net.state_dict() for name, net in self.nets.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name, net in self.nets.items():
            net.load_state_dict(state["nets"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])


def _stacked_architecture(arch: Architecture, members: int) -> Architecture:
    """The architecture whose nets carry a member axis of `members` (unchanged for 0)."""
    if not members:
        return arch
    return replace(
        arch,
        generator=lambda *shape: stacked(arch.generator(*shape), members),
        discriminator=lambda *shape: stacked(arch.discriminator(*shape), members),
        encoder=lambda *shape: stacked(arch.encoder(*shape), members),
    )


def build_pack(
    model_class: type[GenerativeModel],
    configs: list[TrialConfig],
    image_shape: ImageShape,
    device: torch.device,
) -> GenerativeModel:
    """A pack of `configs` (one config but for the seed), each member starting as its lone
    trial starts: that trial's initial weights and its random stream (gvae.pack)."""
    pack = model_class(configs[0], image_shape, device, members=len(configs))
    for member, config in enumerate(configs):
        torch.manual_seed(config.seed)
        lone = model_class(config, image_shape, torch.device("cpu"))
        for name, net in pack.nets.items():
            load_member(net, member, lone.nets[name])
        pack.member_generators.append(_stream_after_seeding(device))
    return pack


def _stream_after_seeding(device: torch.device) -> torch.Generator:
    """A generator in the state that the lone trial's first draw on `device` finds its default
    generator in: on the CPU after building the nets, on a GPU as seeded (nets are built on the
    CPU)."""
    generator = torch.Generator(device)
    if device.type == "cuda":
        generator.manual_seed(torch.initial_seed())
    else:
        generator.set_state(torch.get_rng_state())
    return generator


def fast_kernels(device: torch.device) -> dict[str, bool]:
    """Adam's fused kernel (one pass over all parameters; a 25% faster MLP GAN step on one CPU
    thread) where the device has it, else the multi-tensor one. Both are deterministic."""
    if device.type in FUSED_ADAM_DEVICES:
        return {"fused": True}
    return {"foreach": True}


@contextmanager
def frozen(net: nn.Module) -> Iterator[None]:
    """The net's parameters record no gradient inside: the generator's loss goes through the
    discriminator, whose weight gradients would be computed only to be zeroed before its step."""
    parameters = [p for p in net.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on the loss; a pack's [K] losses are summed, so each member's
    parameters get exactly the gradient of that member's own loss."""
    optimizer.zero_grad(set_to_none=True)
    (loss.sum() if loss.dim() else loss).backward()
    optimizer.step()
