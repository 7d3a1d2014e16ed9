"""nnU-Net v1 ``Generic_UNet`` conventions, for networks whose official code builds on it (UniSeg, BA-Net).

Our networks use nnU-Net v2's building blocks (dynamic-network-architectures' ``PlainConvEncoder``
and ``UNetDecoder``). For the same plans, nnU-Net v1's ``Generic_UNet`` (with the
``convolutional_pooling`` and ``convolutional_upsampling`` that its trainers switch on) computes the
same encoder, but its decoder differs in two choices, which ``conventions="official"`` reproduces:

* kernel size: v1 builds decoder stage ``u`` (coarsest first) with ``conv_kernel_sizes[-(u + 1)]``,
  the kernel of the next-coarser encoder stage; v2's ``UNetDecoder`` uses the kernel of the skip's
  own stage. Same network wherever neighbouring stages share a kernel; they differ where the
  plans give the first stage an anisotropic kernel (e.g. UniSeg's [1, 3, 3]);
* biases: v1's transposed convolutions (``bias=False``) and 1x1 segmentation heads
  (``seg_output_use_bias=False``) have none; v2's have.

Parameter names: :class:`OfficialNames` maps our modules to v1's names (``conv_blocks_context``,
``conv_blocks_localization``, ``tu``, ``seg_outputs``, ``blocks.<i>.conv`` / ``.instnorm``; the
bottleneck and every decoder stage split as ``.0`` = all convs but the last, ``.1`` = the last),
so a state dict saved by the official code loads strictly after :func:`from_official`.

The naming machinery (:class:`OfficialNames`, :func:`from_official`, :func:`to_official`,
:class:`OfficialStateDict`) is not v1-specific: every network with an official key map (MC-Net+,
LeFeD, DoDNet, TransDoDNet, CoTr too) names its modules with it.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_ext.registry import CONVENTIONS


def check_conventions(conventions: str) -> str:
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    return conventions


def v1_decoder_kernel_sizes(kernel_sizes: Sequence) -> list:
    """Kernel sizes that make v2's ``UNetDecoder`` (which reads ``kernel_sizes[-(s + 1)]`` for stage
    ``s``) pick v1's ``conv_kernel_sizes[-s]``: every entry shifted one stage coarser."""
    kernel_sizes = list(kernel_sizes)
    return kernel_sizes[1:] + kernel_sizes[-1:]


def decoder_view(encoder, output_channels: Sequence[int] | None = None,
                 kernel_sizes: Sequence | None = None) -> SimpleNamespace:
    """What ``UNetDecoder`` reads of its encoder, optionally with other output channels or kernels.
    A namespace is no submodule, so the encoder is not repeated in the decoder's state dict."""
    return SimpleNamespace(
        output_channels=list(encoder.output_channels if output_channels is None else output_channels),
        strides=encoder.strides, kernel_sizes=list(encoder.kernel_sizes if kernel_sizes is None else kernel_sizes),
        conv_op=encoder.conv_op, conv_bias=encoder.conv_bias, norm_op=encoder.norm_op,
        norm_op_kwargs=encoder.norm_op_kwargs, dropout_op=encoder.dropout_op,
        dropout_op_kwargs=encoder.dropout_op_kwargs, nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs)


def _without_bias(module: nn.Module) -> nn.Module:
    if module.bias is None:
        return module
    copy = type(module)(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                        padding=module.padding, bias=False)
    with torch.no_grad():
        copy.weight.copy_(module.weight)
    return copy


def remove_decoder_biases(decoder: nn.Module) -> None:
    """v1's bias-free transposed convolutions and segmentation heads on a v2 ``UNetDecoder``."""
    for modules in (decoder.transpconvs, decoder.seg_layers):
        for i, module in enumerate(modules):
            modules[i] = _without_bias(module)


def require_two_convs(n_conv_per_stage: Sequence[int], where: str) -> None:
    """v1 builds the bottleneck and every decoder stage as ``(n - 1) convs + 1 conv``: fewer than two
    convs there has no official counterpart."""
    if min(int(n) for n in n_conv_per_stage) < 2:
        raise ValueError(f"conventions='official' (nnU-Net v1's Generic_UNet) needs at least 2 convs per "
                         f"{where}, got {list(n_conv_per_stage)}")


class OfficialNames:
    """Our modules -> official (nnU-Net v1) parameter-name prefixes, then state-dict key maps."""

    def __init__(self) -> None:
        self._prefix: dict[int, str] = {}
        self._keys: dict[str, str] = {}

    def add(self, module: nn.Module, prefix: str) -> None:
        self._prefix[id(module)] = prefix

    def parameter(self, key: str, official: str) -> None:
        """A parameter held directly by the network (not by a submodule)."""
        self._keys[key] = official

    def sequential(self, modules: nn.Module, prefix: str) -> None:
        """Every child of a ``Sequential`` (or ``ModuleList``) as ``<prefix>.<index>``."""
        for index, module in enumerate(modules):
            self.add(module, f"{prefix}.{index}")

    def tree(self, module: nn.Module, prefix: str) -> None:
        """A module whose official counterpart has the same inner names: every submodule as
        ``<prefix>.<its path inside module>`` (transformer layers, whose names are Deformable DETR's)."""
        for path, submodule in module.named_modules(remove_duplicate=False):
            self.add(submodule, f"{prefix}.{path}" if path else prefix)

    def conv_block(self, block: nn.Module, prefix: str) -> None:
        """A v2 ``ConvDropoutNormReLU`` as v1's ``ConvDropoutNormNonlin`` (``conv``, ``instnorm``)."""
        if not isinstance(block.conv, nn.Identity):
            self.add(block.conv, f"{prefix}.conv")
        if getattr(block, "norm", None) is not None:
            self.add(block.norm, f"{prefix}.instnorm")

    def stacked(self, stacked: nn.Module, prefix: str, split_last: bool = False) -> None:
        """A v2 ``StackedConvBlocks`` as v1's ``StackedConvLayers`` (``blocks.<i>``), or, with
        ``split_last``, as v1's ``Sequential(StackedConvLayers(n - 1), StackedConvLayers(1))``."""
        n = len(stacked.convs)
        for i, block in enumerate(stacked.convs):
            if not split_last:
                self.conv_block(block, f"{prefix}.blocks.{i}")
            elif i < n - 1:
                self.conv_block(block, f"{prefix}.0.blocks.{i}")
            else:
                self.conv_block(block, f"{prefix}.1.blocks.0")

    def decoder(self, decoder: nn.Module, stages: str, upsampling: str, heads: str) -> None:
        """A v2 ``UNetDecoder`` as v1's localisation pathway (its three ModuleList names)."""
        for u, stage in enumerate(decoder.stages):
            self.stacked(stage, f"{stages}.{u}", split_last=True)
            self.add(decoder.transpconvs[u], f"{upsampling}.{u}")
            self.add(decoder.seg_layers[u], f"{heads}.{u}")

    def plain_encoder(self, encoder: nn.Module, prefix: str = "conv_blocks_context") -> None:
        """A v2 ``PlainConvEncoder`` (``pool='conv'``) as v1's ``conv_blocks_context``."""
        last = len(encoder.stages) - 1
        for s, stage in enumerate(encoder.stages):
            self.stacked(stage[-1], f"{prefix}.{s}", split_last=s == last)

    def key_map(self, network: nn.Module) -> dict[str, str]:
        """Every key of ``network.state_dict()`` -> its official name. Several of ours can share one
        official key: v2's blocks register some modules twice (``conv`` and ``all_modules.0``)."""
        modules = dict(network.named_modules(remove_duplicate=False))
        mapping, unnamed = {}, []
        for key in network.state_dict():
            if key in self._keys:
                mapping[key] = self._keys[key]
                continue
            path, _, leaf = key.rpartition(".")
            prefix = self._prefix.get(id(modules[path])) if path else None
            if prefix is None:
                unnamed.append(key)
            else:
                mapping[key] = f"{prefix}.{leaf}"
        if unnamed:
            raise KeyError(f"no official name for {len(unnamed)} parameter(s) of {type(network).__name__}: "
                           f"{', '.join(unnamed[:5])}{' ...' if len(unnamed) > 5 else ''}")
        return mapping


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def from_official(key_map: Mapping[str, str], official: Mapping[str, torch.Tensor],
                  expected_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """An official state dict renamed to ours (``key_map``: ours -> official). Refuses missing,
    unexpected and (with ``expected_shapes``, ours -> shape) mis-shaped tensors, naming them."""
    wanted = set(key_map.values())
    missing, unexpected = wanted - set(official), set(official) - wanted
    problems = []
    if missing:
        problems.append(f"missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_listing(unexpected)}")
    if expected_shapes is not None:
        misshaped = {f"{key_map[k]} {tuple(official[key_map[k]].shape)} (expected {tuple(shape)})"
                     for k, shape in expected_shapes.items()
                     if key_map[k] in official and tuple(official[key_map[k]].shape) != tuple(shape)}
        if misshaped:
            problems.append(f"mis-shaped: {_listing(misshaped)}")
    if problems:
        raise ValueError("the state dict does not match the official network: " + "; ".join(problems))
    return {ours: official[name] for ours, name in key_map.items()}


def to_official(key_map: Mapping[str, str], ours: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under the official names (each shared tensor once)."""
    return {name: ours[key] for key, name in key_map.items()}


class OfficialStateDict:
    """Mixin of the networks with an official convention: ``official_key_map``,
    ``from_official_state_dict`` and ``official_state_dict`` from the network's ``_official_names``."""

    def _official_names(self) -> OfficialNames:
        raise NotImplementedError

    def official_weights_problem(self) -> str | None:
        """Why this instance cannot take official weights (None: it can). Here: a ``conventions``
        other than ``"official"`` (UniSeg, BA-Net); networks with other switches (CoTr's and
        TransDoDNet's ``axis_order``) or other limits (the official depth) override it."""
        conventions = getattr(self, "conventions", "official")
        if conventions != "official":
            return (f"{type(self).__name__} was built with conventions={conventions!r}: official weights need "
                    f"conventions='official' (see the class docstring for the differences)")
        return None

    def official_key_map(self) -> dict[str, str]:
        """Our state-dict keys -> the official implementation's (only where
        :meth:`official_weights_problem` finds none)."""
        problem = self.official_weights_problem()
        if problem is not None:
            raise ValueError(problem)
        return self._official_names().key_map(self)

    def from_official_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An official state dict under our keys, ready for ``load_state_dict(..., strict=True)``."""
        shapes = {key: tuple(value.shape) for key, value in self.state_dict().items()}
        return from_official(self.official_key_map(), state_dict, shapes)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This network's weights under the official names."""
        return to_official(self.official_key_map(), self.state_dict())
