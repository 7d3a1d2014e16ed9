"""Shared building blocks of nnunet-ext networks (used by several methods' architectures).

* ``deformable_attention``: the 3D multi-scale deformable attention / DeTrans encoder (CoTr,
  TransDoDNet);
* ``topology``: strides, total stride, stage sizes, divisibility, and the rules that take a
  network's strides from nnU-Net's plans (every network that follows the plans' strides);
* ``ws_conv``: the weight-standardised convolution (CoTr, DoDNet);
* ``vnet``: V-Net stages, encoder and decoder (MC-Net+, LeFeD);
* ``nnunet_v1``: nnU-Net v1 decoder conventions and the official-name machinery (every network
  with an official key map).

The names below are re-exported for convenience (deformable attention only); import the others
from their modules.
"""
from nnunet_ext.architectures.blocks.deformable_attention import (
    AXIS_ORDERS,
    DeformableEncoder,
    DeformableTransformerEncoderLayer,
    EncoderOutput,
    MultiScaleDeformableAttention3D,
    PositionEmbeddingSine3D,
    get_reference_points,
    get_valid_ratios,
    level_start_index,
    ms_deform_attn_core,
    split_levels,
)

__all__ = [
    "AXIS_ORDERS",
    "DeformableEncoder",
    "DeformableTransformerEncoderLayer",
    "EncoderOutput",
    "MultiScaleDeformableAttention3D",
    "PositionEmbeddingSine3D",
    "get_reference_points",
    "get_valid_ratios",
    "level_start_index",
    "ms_deform_attn_core",
    "split_levels",
]
