"""Helpers shared by the ClassSAM tests: a tiny random SAM checkpoint written by the test itself."""
from __future__ import annotations

from pathlib import Path

import torch

from nnunet_ext.architectures.class_sam import build_sam


def write_tiny_sam_checkpoint(path: Path, seed: int = 0) -> Path:
    """segment_anything's Sam at the 'tiny' sizes, random (seeded), saved as an official checkpoint is:
    a plain state dict."""
    torch.manual_seed(seed)
    torch.save(build_sam("tiny").state_dict(), path)
    return path
