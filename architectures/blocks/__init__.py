"""Shared building blocks of nnunet-ext networks (used by several methods' architectures).

``deformable_attention``: the single 3D multi-scale deformable attention / DeTrans encoder
implementation, shared by CoTr and TransDoDNet.
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
