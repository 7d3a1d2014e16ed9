"""Small variants of every registered network, for CPU tests and benchmarks.

``small_network(name, conventions)`` builds the class that ``paper_network(name, conventions)``
builds, with the same convention keywords (the registry's ``official_kwargs``) and the same code
paths (deep supervision, task conditioning, deformable attention, dynamic heads, V-Net decoders),
but narrow and shallow, with an input of a few thousand voxels: forward and backward take
milliseconds, so a test or a CPU benchmark can cover every network. The widths are no paper's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nnunet_ext.registry import CONVENTIONS, paper_networks, unknown_name_message


@dataclass(frozen=True)
class SmallNetwork:
    build: Callable[..., nn.Module]  # keyword arguments: the registry's official_kwargs
    input_shape: tuple[int, ...]  # (batch, channels, *spatial)
    classes: int  # channels of the (first) output
    task: int | None = None  # set_task before the forward (task-conditioned networks)


def _plain_unet(first_kernel: tuple[int, int, int], n_stages: int = 4, widths=(8, 16, 24, 32)) -> dict:
    """nnU-Net PlainConvUNet keywords: 3D, first pooling (1, 2, 2), 3x3x3 kernels after the first."""
    return dict(n_stages=n_stages, features_per_stage=list(widths[:n_stages]), conv_op=nn.Conv3d,
                kernel_sizes=[list(first_kernel)] + [[3, 3, 3]] * (n_stages - 1),
                strides=[[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n_stages - 2), n_conv_per_stage=2,
                n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})


def _cotr(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.cotr import CoTr

    return CoTr(1, 3, (8, 32, 32), features=(8, 16, 24, 24), blocks_per_layer=(1, 1, 1), d_model=24, n_heads=2,
                n_layers=2, d_ffn=32, deep_supervision=True, **kwargs)


def _banet(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.banet import BANet

    # isotropic kernels, as the paper's (KiPA22) topology: the conventions differ by the decoder biases
    return BANet(input_channels=1, num_classes=3, deep_supervision=True, **_plain_unet((3, 3, 3)), **kwargs)


def _uniseg(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.uniseg import UniSeg

    return UniSeg(4, num_classes=3, deep_supervision=True, patch_size=[8, 32, 32], task_channels=[1, 4, 2],
                  annotated_classes=[[True, True, False], [True, False, True], [True, True, True]],
                  **_plain_unet((1, 3, 3)), **kwargs)  # the paper's first kernel: the conventions' kernels differ


def _mcnet(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.mcnet import MCNet

    return MCNet(1, 2, strides=[[1, 2, 2], [2, 2, 2]], base_filters=4, **kwargs)


def _lefed(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.lefed import LeFeD

    return LeFeD(1, 2, strides=((1, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1)), base_features=4, **kwargs)


def _dodnet(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.dodnet import DoDNet

    return DoDNet(1, 3, 2, features=(16, 16, 16, 16), blocks=(1, 1, 1, 1),
                  strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], **kwargs)


def _transdodnet(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.transdodnet import TransDoDNet

    return TransDoDNet(1, 3, 2, strides=[[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]], blocks=(1, 1, 1, 1),
                       widths=(4, 4, 4, 4), stem_channels=8, expansion=2, decoder_channels=(8, 8, 8, 8), hidden=24,
                       heads=2, ffn=32, encoder_layers=1, decoder_layers=2, points=2, **kwargs)


def _class_sam(**kwargs) -> nn.Module:
    from nnunet_ext.architectures.class_sam import ClassSAM

    return ClassSAM(input_channels=3, num_classes=3, sam_model_type="tiny", **kwargs)


SMALL_NETWORKS: dict[str, SmallNetwork] = {
    "CoTr": SmallNetwork(_cotr, (2, 1, 8, 32, 32), 3),
    "BANet": SmallNetwork(_banet, (2, 1, 8, 32, 32), 3),
    "UniSeg": SmallNetwork(_uniseg, (2, 4, 8, 32, 32), 3, task=1),
    "MCNetPlus": SmallNetwork(_mcnet, (2, 1, 8, 16, 16), 2),
    "LeFeD": SmallNetwork(_lefed, (2, 1, 4, 16, 16), 2),
    "DoDNet": SmallNetwork(_dodnet, (2, 1, 8, 16, 16), 2, task=1),
    "TransDoDNet": SmallNetwork(_transdodnet, (2, 1, 8, 32, 32), 2, task=2),
    "ClassSAM": SmallNetwork(_class_sam, (1, 3, 32, 32), 3),
}


# ``paper_network(name)``'s input at its paper patch, batch 2: (batch, channels, *patch)
PAPER_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "CoTr": (2, 1, 48, 192, 192), "BANet": (2, 1, 128, 128, 128), "UniSeg": (2, 4, 64, 192, 192),
    "MCNetPlus": (2, 1, 112, 112, 80), "LeFeD": (2, 1, 96, 96, 96), "DoDNet": (2, 1, 64, 192, 192),
    "TransDoDNet": (2, 1, 64, 192, 192), "ClassSAM": (2, 3, 1024, 1024),
}
PAPER_TASKS: dict[str, int] = {"UniSeg": 0, "DoDNet": 0, "TransDoDNet": 0}  # set before a forward pass


def distinct_conventions() -> list[tuple[str, str]]:
    """(network, conventions) for every registered network in each convention that builds another
    network: "official" only where the registry gives official keywords."""
    return [(name, conventions) for name, entry in paper_networks().items() for conventions in CONVENTIONS
            if conventions == "default" or entry.official_kwargs]


def small_network(name: str, conventions: str = "default", seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The small variant of registered network ``name`` in ``conventions`` (the registry's
    ``official_kwargs``), seeded, its task set where it has tasks, and an input for it."""
    networks = paper_networks()
    if name not in networks or name not in SMALL_NETWORKS:
        raise KeyError(unknown_name_message("network", name, sorted(SMALL_NETWORKS)))
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    spec = SMALL_NETWORKS[name]
    kwargs = dict(networks[name].official_kwargs) if conventions == "official" else {}
    torch.manual_seed(seed)
    network = spec.build(**kwargs)
    if spec.task is not None:
        network.set_task(spec.task)
    return network, torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(seed))
