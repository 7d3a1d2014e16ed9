"""nnunet-ext: published segmentation methods as nnU-Net v2 plug-ins.

This module is imported at every interpreter start-up (through ``nnunet_ext.pth``), so it must
stay cheap: no torch, no nnunetv2, no numpy here.
"""

__version__ = "0.1.0"
