"""Synthetic datasets for nnU-Net v2 and the demo's overlay figure.

Kept light on purpose: importing this package pulls in numpy and scipy only (no torch, no
nnunetv2); SimpleITK is imported when files are written, matplotlib when a figure is drawn.
"""

from nnunet_ext.datasets.figures import save_overlay_figure
from nnunet_ext.datasets.synthetic import (
    LESION,
    ORGANS,
    SyntheticSpec,
    case_identifier,
    dataset_folder_name,
    make_case,
    write_synthetic_dataset,
)

__all__ = [
    "LESION",
    "ORGANS",
    "SyntheticSpec",
    "case_identifier",
    "dataset_folder_name",
    "make_case",
    "save_overlay_figure",
    "write_synthetic_dataset",
]
