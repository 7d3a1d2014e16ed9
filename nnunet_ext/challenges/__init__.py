"""Challenge data in and out of nnU-Net: KiTS21, AMOS22 and SegRap2023.

``convert``: a challenge's official release layout -> an nnU-Net v2 raw dataset (one module per
challenge describes its release; ``common`` is the streaming, resumable, parallel engine with the
geometry checks). ``submission``: nnU-Net predictions -> the challenge's submission files, and the
validator to run before uploading. ``replicas``: tiny synthetic copies of the release layouts for
tests and benchmarks.

Importing this package is cheap (numpy only); SimpleITK is imported when files are read.
"""
from __future__ import annotations

from nnunet_ext.challenges import amos22, kits21, segrap2023

#: challenge name -> module with ``plan(src, **options)`` and its constants
CONVERTERS = {"kits21": kits21, "amos22": amos22, "segrap2023": segrap2023}

__all__ = ["CONVERTERS", "amos22", "kits21", "segrap2023"]
