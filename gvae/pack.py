"""Packs: K trials of one config that differ only in seed, trained in lockstep as one computation.

A paper-MLP trial is far too small for a GPU: its speed is set by kernel launches, not arithmetic.
A pack stacks the K members' weights ([K, in, out]) and runs every layer as one batched matmul, so
K models cost about the launches of one. Every operation of a step works per member: batched
matmuls, elementwise optimisers (Adam, RMSprop), weight clipping, and losses taken per member
(`torch.vmap`) and summed, so no member's numbers reach another's gradients.

Member k starts where the trial of seed k alone starts: its weights are that trial's initial
weights, it draws its batches and noise from generators in that trial's starting state, and it
is evaluated on that trial's evaluation noise. Its numbers differ from the lone trial's only by
the rounding of batched against plain matmuls, then by how training amplifies that; a pack is
deterministic, so it reproduces exactly when re-run as the same pack on the same device.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from gvae.errors import GvaeError


class StackedLinear(nn.Module):
    """K linear layers applied to [K, B, in] at once: weight [K, in, out], bias [K, 1, out]."""

    def __init__(self, members: int, width_in: int, width_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, width_in, width_out))
        self.bias = nn.Parameter(torch.empty(members, 1, width_out))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, inputs, self.weight)

    @torch.no_grad()
    def load_member(self, member: int, linear: nn.Linear) -> None:
        self.weight[member].copy_(linear.weight.t())
        self.bias[member, 0].copy_(linear.bias)


def stacked(net: nn.Module, members: int) -> nn.Module:
    """The net with a leading member axis: each Linear becomes a StackedLinear of `members`, and
    Flatten / Unflatten move one dimension right. Other layers are elementwise and stay."""
    for name, child in net.named_children():
        setattr(net, name, _stacked_layer(child, members))
    return net


def _stacked_layer(layer: nn.Module, members: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return StackedLinear(members, layer.in_features, layer.out_features)
    if isinstance(layer, nn.Flatten):
        return nn.Flatten(layer.start_dim + 1, layer.end_dim)
    if isinstance(layer, nn.Unflatten):
        return nn.Unflatten(layer.dim + 1, layer.unflattened_size)
    if list(layer.parameters(recurse=False)) or list(layer.buffers(recurse=False)):
        # Weights or statistics StackedLinear cannot stack: convolutions', batch norm's.
        raise GvaeError("pack: only the mlp architecture can be packed; use arch mlp or pack 1")
    return stacked(layer, members)  # a container (Sequential, Encoder): its children in turn


def unstacked(net: nn.Module, member: int) -> nn.Module:
    """Member `member` of a stacked Sequential as a lone net (its weights copied out): what its
    lone trial's net would be with those weights."""
    return nn.Sequential(*(_lone_layer(layer, member) for layer in net.children()))


def _lone_layer(layer: nn.Module, member: int) -> nn.Module:
    if isinstance(layer, StackedLinear):
        width_in, width_out = layer.weight.shape[1:]
        # skip_init: no random initialisation, which would draw from the global generator.
        lone = skip_init(nn.Linear, width_in, width_out, device=layer.weight.device)
        with torch.no_grad():
            lone.weight.copy_(layer.weight[member].t())
            lone.bias.copy_(layer.bias[member, 0])
        return lone
    if isinstance(layer, nn.Flatten):
        return nn.Flatten(layer.start_dim - 1, layer.end_dim)
    if isinstance(layer, nn.Unflatten):
        return nn.Unflatten(layer.dim - 1, layer.unflattened_size)
    if isinstance(layer, nn.Sequential):
        return unstacked(layer, member)
    return layer  # elementwise, without state


@torch.no_grad()
def load_member(stack: nn.Module, member: int, net: nn.Module) -> None:
    """Copy a lone net's weights into member `member` of its stacked form."""
    lone = [m for m in net.modules() if isinstance(m, nn.Linear)]
    packed = [m for m in stack.modules() if isinstance(m, StackedLinear)]
    for stacked_layer, layer in zip(packed, lone, strict=True):
        stacked_layer.load_member(member, layer)


def member_noise(
    generators: list[torch.Generator], count: int, width: int, device: torch.device
) -> torch.Tensor:
    """[K, count, width] standard normal draws, row k from member k's generator (what the lone
    trial of that member draws for `torch.randn(count, width)`)."""
    return torch.stack([torch.randn(count, width, generator=g, device=device) for g in generators])
