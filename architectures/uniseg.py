"""UniSeg: one prompt-driven U-Net for many datasets (tasks) and modalities.

Follows Ye et al., "UniSeg: A Prompt-driven Universal Segmentation Model as well as A Strong
Representation Learner" (MICCAI 2023) and its official nnU-Net v1 code (github.com/yeerwen/UniSeg,
``Upstream/nnunet/network_architecture/Prompt_generic_UNet.py``), rebuilt on nnU-Net v2's
building blocks:

* encoder: dynamic-network-architectures' ``PlainConvEncoder``, configured exactly like nnU-Net's
  ``PlainConvUNet`` from the plans, except the first convolution: one input conv per distinct
  channel count of the tasks (official ``conv_1`` / ``conv_2`` / ``conv_4``), all sharing the
  first block's dropout, norm and nonlinearity. The input always carries the merged dataset's
  channels (tasks with fewer channels are zero-padded by the data); the network reads only the
  first ``task_channels[task]`` channels, so padding can never leak into a task's features;
* universal prompt: a learned ``(1, num_tasks, *bottleneck_size)`` tensor shared by all tasks;
* FUSE: ``concat(bottleneck, prompt)`` -> ``fuse_convs`` conv-norm-nonlin layers ->
  ``num_tasks`` channels, one task-specific prompt per task (so each task's prompt depends on
  the image and on every task's learned prompt); the current task's channel is concatenated to
  the bottleneck, and the decoder starts from ``C_bottleneck + 1`` channels;
* decoder: dynamic-network-architectures' ``UNetDecoder`` (deep supervision outputs full
  resolution first, ``.decoder.deep_supervision`` is nnU-Net's inference switch).

The task comes from :class:`nnunet_ext.tasks.conditioning.TaskConditioning` (``set_task``), not
from a forward argument, because nnU-Net calls ``network(x)``. Outputs are logits over the
merged label space; in eval mode the classes the task does not annotate are masked.

``conventions`` (constructor keyword, settable in the plans' ``arch_kwargs``):

* ``"default"``: nnU-Net v2's decoder (each decoder stage with its skip's kernel; biased
  transposed convolutions and 1x1 heads), one input conv per channel count among the tasks;
* ``"official"``: the official network, whose state dict loads strictly after
  :meth:`UniSeg.from_official_state_dict` (32,114,381 parameters at :func:`paper_uniseg`'s
  configuration): nnU-Net v1's decoder (each decoder stage with the next-coarser stage's kernel,
  so (3,3,3) instead of (1,3,3) in the last stage of the paper plans; no biases on transposed
  convolutions and heads, see :mod:`nnunet_ext.architectures.blocks.nnunet_v1`) and always the
  three input convs ``conv_1`` / ``conv_2`` / ``conv_4``.

Both keep the prompt sized by the plans' strides (the official code divides the patch by
16, 32, 32, which is the same for its plans).

torch.compile: no graph break. The task's prompt channel and class mask are indexed by a tensor, so
tasks share a compiled graph, except that the input conv is chosen by the task's channel count (a
Python key: choosing a module by a tensor would mean running every input conv): one graph per
distinct channel count (three for the official 11 tasks: 1, 2 and 4 channels).
"""
from __future__ import annotations

from typing import List, Sequence, Type, Union

import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from nnunet_ext.architectures.blocks.nnunet_v1 import (OfficialNames, OfficialStateDict, check_conventions,
                                                       decoder_view, remove_decoder_biases, require_two_convs,
                                                       v1_decoder_kernel_sizes)
from nnunet_ext.architectures.blocks.topology import bottleneck_size
from nnunet_ext.tasks.conditioning import TaskConditioning

IntOrList = Union[int, List[int], tuple]

# The official upstream's 11 tasks, in the order of UniSeg_Trainer.task (task id = position).
# Channels: UniSeg_Trainer's data loader feeds BraTS21 (id 9: T1, T1ce, T2, FLAIR) with 4 channels
# and AutoPET (id 10: CT, PET) with 2; every other task is single-channel CT, or T2 MR for prostate.
UNISEG_TASKS: tuple[str, ...] = ("liver", "kidney", "hepatic vessel", "pancreas", "colon", "lung", "spleen",
                                 "vertebrae (VerSe20)", "prostate", "brain tumour (BraTS21)",
                                 "whole-body tumour (AutoPET)")
UNISEG_TASK_CHANNELS: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 2)
# Official UniSeg_Trainer.task_class: the shared 4-channel head is sliced to the first k channels.
UNISEG_TASK_CLASSES: tuple[int, ...] = (3, 3, 3, 3, 2, 2, 2, 2, 2, 4, 2)
# The official first stage has exactly these input convs (UniSeg_Trainer passes [1, 2, 4]).
OFFICIAL_INPUT_CHANNELS: tuple[int, ...] = (1, 2, 4)


class UniSeg(AbstractDynamicNetworkArchitectures, TaskConditioning, OfficialStateDict):
    """UniSeg configured by nnU-Net's ``PlainConvUNet`` keyword arguments (plans ``arch_kwargs``) plus
    ``patch_size`` (sizes the prompt), ``task_channels`` (input channels per task),
    ``annotated_classes`` (per task, which merged classes it labels), ``fuse_convs`` and
    ``conventions`` (``"default"`` or ``"official"``, see the module docstring).

    ``input_channels`` must equal ``max(task_channels)``: it is the merged dataset's channel count.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: IntOrList, conv_op: Type[_ConvNd],
                 kernel_sizes: IntOrList, strides: IntOrList, n_conv_per_stage: IntOrList, num_classes: int,
                 n_conv_per_stage_decoder: IntOrList, conv_bias: bool = False,
                 norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 dropout_op: Type[_DropoutNd] | None = None, dropout_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, *,
                 patch_size: Sequence[int], task_channels: Sequence[int],
                 annotated_classes: Sequence[Sequence[bool]] | None = None, fuse_convs: int = 3,
                 conventions: str = "default"):
        super().__init__()
        self.conventions = check_conventions(conventions)
        task_channels = [int(c) for c in task_channels]
        if not task_channels or min(task_channels) < 1:
            raise ValueError(f"task_channels needs one positive channel count per task, got {task_channels}")
        if input_channels != max(task_channels):
            raise ValueError(f"input_channels ({input_channels}) must be the merged dataset's channel count, "
                             f"max(task_channels) = {max(task_channels)} (task_channels={task_channels})")
        if fuse_convs < 1:
            raise ValueError(f"fuse_convs must be >= 1, got {fuse_convs}")
        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        if isinstance(kernel_sizes, int):
            kernel_sizes = [kernel_sizes] * n_stages
        if isinstance(strides, int):
            strides = [strides] * n_stages
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
        if len(n_conv_per_stage_decoder) != n_stages - 1:
            raise ValueError(f"n_conv_per_stage_decoder needs n_stages - 1 = {n_stages - 1} entries, "
                             f"got {list(n_conv_per_stage_decoder)}")
        official = conventions == "official"
        if official:
            if not set(task_channels) <= set(OFFICIAL_INPUT_CHANNELS):
                raise ValueError(f"conventions='official': the official UniSeg has input convs for "
                                 f"{OFFICIAL_INPUT_CHANNELS} channels only, got task_channels={task_channels}")
            bottleneck_convs = n_conv_per_stage if isinstance(n_conv_per_stage, int) else n_conv_per_stage[-1]
            require_two_convs([bottleneck_convs, fuse_convs, *n_conv_per_stage_decoder],
                              "bottleneck, FUSE and decoder stage")

        self.init_task_conditioning(len(task_channels), annotated_classes, num_classes)
        self.task_channels = tuple(task_channels)
        self.input_channels = input_channels
        self.num_classes = num_classes
        self._input_key = str(task_channels[0])  # set by set_task; a Python key selects the input conv

        self.encoder = PlainConvEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                        n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True,
                                        nonlin_first=nonlin_first)
        # The first conv of stage 0 is replaced by the task's own input conv (run before the encoder);
        # the block keeps its dropout/norm/nonlin, which all input convs share as in the official
        # ConvDropoutNormNonlin_multi_channel. Identity instead of keeping the max-channel conv, so no
        # parameter sits unused (DDP would complain, and the count would be off).
        first_block = self.encoder.stages[0][-1].convs[0]
        first_conv = first_block.conv
        first_block.conv = nn.Identity()
        first_block.all_modules[0] = first_block.conv
        self.input_convs = nn.ModuleDict({
            str(c): conv_op(c, first_conv.out_channels, first_conv.kernel_size, first_conv.stride,
                            padding=first_conv.padding, bias=conv_bias)
            for c in (OFFICIAL_INPUT_CHANNELS if official else sorted(set(task_channels)))
        })

        bottleneck_features = self.encoder.output_channels[-1]
        # the prompt has the bottleneck's size; a patch the strides do not divide could not run through the
        # U-Net's skip concatenations, so it is refused here rather than at the first batch
        self.bottleneck_size = bottleneck_size(patch_size, self.encoder.strides, "UniSeg's patch_size")
        # randn as the official ``intermedia_prompt``; nnU-Net's He init only touches convs.
        self.prompt = nn.Parameter(torch.randn(1, self.num_tasks, *self.bottleneck_size))
        fuse_in = bottleneck_features + self.num_tasks
        fuse_hidden = fuse_in // 4
        self.fuse = StackedConvBlocks(fuse_convs, conv_op, fuse_in, [fuse_hidden] * (fuse_convs - 1) + [self.num_tasks],
                                      kernel_sizes[-1], 1, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                      dropout_op_kwargs, nonlin, nonlin_kwargs, nonlin_first)

        # The decoder's bottleneck input grows by the task prompt channel; a view, not the encoder
        # module, so the encoder is not repeated in the state dict (as in PlainConvUNet's decoder.encoder.*).
        kernels = v1_decoder_kernel_sizes(self.encoder.kernel_sizes) if official else self.encoder.kernel_sizes
        view = decoder_view(self.encoder, list(self.encoder.output_channels[:-1]) + [bottleneck_features + 1],
                            kernels)
        self.decoder = UNetDecoder(view, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first=nonlin_first)
        if official:
            remove_decoder_biases(self.decoder)

        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        # Every input conv depends on the input channels (they differ in shape by design).
        self.keys_to_in_proj = tuple(f"input_convs.{key}" for key in self.input_convs)

    def set_task(self, task_id: int) -> None:
        """Set the task; also remembers its input conv by Python key (choosing a module needs a
        Python value, and reading the task buffer with ``.item()`` would sync the GPU every step)."""
        super().set_task(task_id)
        self._input_key = str(self.task_channels[int(task_id)])

    def forward(self, x: torch.Tensor):
        self.require_task()
        return self._decode_task(*self._encode(x))

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder skips and every task's prompt (FUSE); shared by all tasks with the current task's
        channel count (the input conv is chosen by it)."""
        if x.shape[1] != self.input_channels:
            raise ValueError(f"{type(self).__name__} expects the merged dataset's {self.input_channels} input "
                             f"channels (tasks with fewer are zero-padded), got {x.shape[1]}")
        n_channels = int(self._input_key)
        stem = self.input_convs[self._input_key](x[:, :n_channels])
        if self.training and len(self.input_convs) > 1:
            # Under nnU-Net's DDP (no find_unused_parameters) every parameter must take part in each
            # step; the other channel counts' input convs join the graph with weight zero.
            stem = stem + 0.0 * sum(p.sum() for key, conv in self.input_convs.items() if key != self._input_key
                                    for p in conv.parameters())
        skips = self.encoder(stem)
        bottleneck = skips[-1]
        if tuple(bottleneck.shape[2:]) != self.bottleneck_size:
            raise ValueError(f"bottleneck of size {tuple(bottleneck.shape[2:])} does not match the prompt's "
                             f"{self.bottleneck_size}: UniSeg runs on patches of its training patch size "
                             f"(nnU-Net's sliding window does)")
        prompt = self.prompt.to(bottleneck.dtype).expand(bottleneck.shape[0], *self.prompt.shape[1:])
        return skips, self.fuse(torch.cat((bottleneck, prompt), 1))

    def _decode_task(self, skips: list[torch.Tensor], task_prompts: torch.Tensor):
        """The current task's prompt channel, the decoder and the mask: UniSeg's per-task compute."""
        bottleneck = skips[-1]
        # Tensor index (not a Python int): no GPU sync, no torch.compile recompilation per task.
        task_prompt = torch.index_select(task_prompts, 1, self.task_index.view(1))
        output = self.decoder(skips[:-1] + [torch.cat((bottleneck, task_prompt), 1)])
        if isinstance(output, (list, tuple)):
            return [self.mask_unannotated(o, self.task_index) for o in output]
        return self.mask_unannotated(output, self.task_index)

    def forward_tasks(self, x: torch.Tensor, task_ids: Sequence[int]) -> list:
        """``[set_task(t); forward(x) for t in task_ids]`` with the encoder and FUSE run once per distinct
        channel count among the tasks (each count has its own input conv); the decoder runs per task
        (``nnunet-ext predict --task all``). Same operations on the same shared tensors as the
        single-task forward, so the outputs are equal; the task set before the call is restored."""
        previous, was_set, key = self.task_index.clone(), self.task_is_set, self._input_key
        outputs: dict[int, object] = {}
        try:
            for channels in dict.fromkeys(self.task_channels[int(t)] for t in task_ids):
                group = [int(t) for t in task_ids if self.task_channels[int(t)] == channels]
                self.set_task(group[0])
                shared = self._encode(x)
                for task_id in group:
                    self.set_task(task_id)
                    outputs[task_id] = self._decode_task(*shared)
        finally:
            self.task_index.copy_(previous)
            self.task_is_set, self._input_key = was_set, key
        return [outputs[int(t)] for t in task_ids]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map voxels, for nnU-Net's VRAM estimate: encoder (its stage-0 block counts the
        input conv's output), FUSE at the bottleneck and the decoder."""
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.fuse.compute_conv_feature_map_size(list(self.bottleneck_size)) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    def _official_names(self) -> OfficialNames:
        """Names of the official ``UniSeg_model`` (``Prompt_generic_UNet.py``)."""
        names = OfficialNames()
        names.plain_encoder(self.encoder)
        for channels, conv in self.input_convs.items():
            names.add(conv, f"conv_blocks_context.0.blocks.0.conv_{channels}")
        names.parameter("prompt", "intermedia_prompt")
        names.stacked(self.fuse, "fusion_layer")
        names.decoder(self.decoder, "conv_blocks_localization", "tu", "seg_outputs")
        return names

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He initialisation (what PlainConvUNet uses); the prompt keeps its randn init."""
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        InitWeights_He(1e-2)(module)


def paper_uniseg(conventions: str = "default") -> UniSeg:
    """The official upstream configuration: 11 tasks (:data:`UNISEG_TASKS`), 1, 2 or 4 input
    channels, the shared 4-channel head sliced per task (``task_class``), patch 64x192x192 and the
    merged DoDNetPlans topology (features 32-320, pooling [1,2,2] then [2,2,2] x4, [1,3,3] first).
    32,059,905 parameters; 32,114,381 with ``conventions="official"`` (the official count)."""
    num_classes = max(UNISEG_TASK_CLASSES)
    return UniSeg(input_channels=max(UNISEG_TASK_CHANNELS), n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320],
                  conv_op=nn.Conv3d, kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5,
                  strides=[[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * 4, n_conv_per_stage=[2] * 6,
                  num_classes=num_classes, n_conv_per_stage_decoder=[2] * 5, conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
                  deep_supervision=True, patch_size=[64, 192, 192], task_channels=list(UNISEG_TASK_CHANNELS),
                  annotated_classes=[[c < k for c in range(num_classes)] for k in UNISEG_TASK_CLASSES],
                  conventions=conventions)
