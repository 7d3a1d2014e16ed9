"""Weight-standardised 3D convolution (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", arXiv 1903.10520), as DoDNet's official ``Conv3d``
(github.com/jianpengz/DoDNet, ``a_DynConv/unet3D_DynConv882.py``) and CoTr's ``Conv3d_wd``
(github.com/YtongXie/CoTr, ``CNNBackbone.py``) compute it.
"""
from __future__ import annotations

import torch
from torch import nn


class WSConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose weight is standardised before every convolution: each output filter is
    centred (mean over input channels and kernel) and divided by ``sqrt(var + eps)``, ``var`` the
    unbiased variance (``torch.var``'s default), ``eps`` 1e-12, as both official codes.

    ``float32_statistics``: CoTr's computation - in float32 (float64 stays float64), the result cast
    back to the weight's dtype, which keeps fp16/bf16 weights precise; False (default): DoDNet's, in
    the weight's dtype. For float32 and float64 weights both give bit-identical weights; each keeps
    its own order of operations, so that each network's gradients also stay bit-identical to its
    earlier version (where the weight gradient arrives non-contiguous, the two orders differ in the
    last bit). Other arguments: ``nn.Conv3d``'s.
    """

    def __init__(self, *args, eps: float = 1e-12, float32_statistics: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.float32_statistics = float32_statistics

    def standardised_weight(self) -> torch.Tensor:
        weight = self.weight
        if not self.float32_statistics:
            flat = weight.reshape(weight.shape[0], -1)
            centred = flat - flat.mean(dim=1, keepdim=True)
            return (centred / torch.sqrt(centred.var(dim=1, keepdim=True) + self.eps)).view_as(weight)
        w = weight.to(torch.promote_types(weight.dtype, torch.float32))
        w = w - w.mean(dim=(1, 2, 3, 4), keepdim=True)
        std = torch.sqrt(w.flatten(1).var(dim=1) + self.eps).view(-1, 1, 1, 1, 1)
        return (w / std).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardised_weight(), self.bias)
