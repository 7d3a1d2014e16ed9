"""DoDNet: one network, one dynamic segmentation head per task, for partially labelled datasets.

Follows Zhang et al., "DoDNet: Learning to segment multi-organ and tumors from multiple
partially labeled datasets" (CVPR 2021) and its official code (github.com/jianpengz/DoDNet,
``a_DynConv/unet3D_DynConv882.py``), written anew:

* encoder: WS-conv stem ``input_channels -> 32``, five residual stages ([1, 2, 2, 2, 2]
  pre-activation blocks GN(16) -> ReLU -> weight-standardised 3x3x3 conv, twice, at
  32/64/128/256/256 channels); stages 1-4 downsample. The strides are a constructor argument so
  nnU-Net's plans can drive them (anisotropic patches); the default is the official 2x2x2;
* fusion GN -> ReLU -> WS 1x1 conv at the bottleneck (official ``fusionConv``);
* decoder: trilinear upsampling to the skip's size (x2, or the stage's stride), additive skip,
  one residual block per level (256->128->64->32->32), pre-class GN -> ReLU -> 1x1 conv 32 -> 8;
* controller: GN -> ReLU -> global average pool of the fused bottleneck, concatenated with the
  task's one-hot code -> 1x1 conv -> the dynamic head's 162 parameters per sample;
* dynamic head: 8 -> 8 -> 8 -> ``head_channels`` 1x1x1 convs with ReLU between, run for the whole
  batch as ONE grouped conv per layer (groups = batch size), so a batch mixing tasks costs no more
  than a single-task batch.

Outputs are per-task sigmoid logits (``head_channels`` of them; paper: 2, [organ incl. tumour,
tumour]). nnU-Net's predictor and validation need softmax-style logits over the merged label
space, so a network built with a :class:`SigmoidLabelCoding` (the trainer does this) returns, in
eval mode, merged-class scores (:meth:`SigmoidLabelCoding.class_logits`) whose argmax is the
paper's decision rule, with the classes the task does not annotate masked. In training mode it
always returns the sigmoid logits the loss needs.

torch.compile: no graph break in training or eval mode (with a label coding too); the task is a
tensor (``task_index`` or the ``tasks`` argument), so one compiled graph serves every task.

Official weights: at the paper configuration this is the official ``unet3D`` (no conventions to
switch); ``official_key_map()`` / ``from_official_state_dict(sd)`` / ``official_state_dict()``
rename between our keys and the official ones (``conv1``, ``layer0`` .. ``layer4``, ``fusionConv``,
``x8_resb`` .. ``x1_resb``, ``precls_conv``, ``GAP``, ``controller``). Needs the official five stages.

How sigmoid channels generalise to any merged dataset (decided here, see :class:`SigmoidLabelCoding`):
each class a task annotates gets one sigmoid channel of that task; a class declared *nested* in
another class of the same task (``nested={"lesion": "liver"}``) makes the parent's channel cover
the child too. The paper's [organ incl. tumour, tumour] is exactly ``nested={"tumour": "organ"}``;
with nothing nested the channels are mutually exclusive, one per class.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.architectures.blocks.nnunet_v1 import OfficialNames, OfficialStateDict
from nnunet_ext.architectures.blocks.topology import as_strides, leading_strides
from nnunet_ext.architectures.blocks.ws_conv import WSConv3d
from nnunet_ext.tasks.conditioning import TaskConditioning
from nnunet_ext.tasks.task_map import TaskMap, TaskMapError

PAPER_FEATURES: tuple[int, ...] = (32, 64, 128, 256, 256)
PAPER_BLOCKS: tuple[int, ...] = (1, 2, 2, 2, 2)
PAPER_STRIDES: tuple[tuple[int, int, int], ...] = ((1, 1, 1),) + ((2, 2, 2),) * 4
HEAD_FEATURES = 8  # channels of pre-class features and of the dynamic head's hidden layers
MOTS_TASKS = 7
GROUPS = 16  # GroupNorm groups throughout


def _pre_activation(channels: int) -> list[nn.Module]:
    return [nn.GroupNorm(GROUPS, channels), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """Pre-activation block: (GN -> ReLU -> WS conv3) x 2 + shortcut; the shortcut is
    GN -> ReLU -> WS 1x1 conv (with the stride) where shape or channels change (official)."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1)):
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.body = nn.Sequential(
            *_pre_activation(in_channels), WSConv3d(in_channels, out_channels, 3, stride, 1, bias=False),
            *_pre_activation(out_channels), WSConv3d(out_channels, out_channels, 3, 1, 1, bias=False))
        self.shortcut: nn.Module = nn.Identity()
        if any(s != 1 for s in stride) or in_channels != out_channels:
            self.shortcut = nn.Sequential(*_pre_activation(in_channels),
                                          WSConv3d(in_channels, out_channels, 1, stride, 0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _stage(in_channels: int, out_channels: int, blocks: int, stride: Sequence[int]) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(in_channels, out_channels, stride),
                         *[ResidualBlock(out_channels, out_channels) for _ in range(blocks - 1)])


class DoDNetDecoder(nn.Module):
    """Upsample to the skip's size, add it, one residual block; then the pre-class 1x1 conv.

    ``deep_supervision`` is accepted because nnU-Net flips it for inference; DoDNet has no deep
    supervision (official), so it changes nothing."""

    def __init__(self, features: Sequence[int]):
        super().__init__()
        self.deep_supervision = False
        # level i adds skip i (features[i] channels) and reduces to the next level's channels
        self.blocks = nn.ModuleList(ResidualBlock(features[i], features[max(i - 1, 0)])
                                    for i in range(len(features) - 1))
        self.precls = nn.Sequential(*_pre_activation(features[0]), nn.Conv3d(features[0], HEAD_FEATURES, 1))

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        for level in reversed(range(len(self.blocks))):
            skip = skips[level]
            # to the skip's size: x2 for a stride-2 stage, the stage's stride in general, and the
            # same coordinates as nn.Upsample(scale_factor) (align_corners=False) when it divides
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False) + skip
            x = self.blocks[level](x)
        return self.precls(x)


def dynamic_head_sizes(head_channels: int, hidden: int = HEAD_FEATURES) -> tuple[list[int], list[int]]:
    """(weight counts, bias counts) of the head's three layers; paper: [64, 64, 16] + [8, 8, 2]."""
    return [hidden * hidden, hidden * hidden, hidden * head_channels], [hidden, hidden, head_channels]


def dynamic_head(features: torch.Tensor, params: torch.Tensor, head_channels: int) -> torch.Tensor:
    """Each sample's features through its own generated 1x1x1 MLP, all samples in ONE grouped
    conv per layer: the batch is folded into channels (``(1, B*8, ...)``), sample ``b``'s weights
    are rows ``b*out .. (b+1)*out`` of the stacked kernel, ``groups = B``."""
    batch, hidden = features.shape[:2]
    weight_sizes, bias_sizes = dynamic_head_sizes(head_channels, hidden)
    if params.shape != (batch, sum(weight_sizes) + sum(bias_sizes)):
        raise ValueError(f"dynamic head parameters must be ({batch}, {sum(weight_sizes) + sum(bias_sizes)}), "
                         f"got {tuple(params.shape)}")
    pieces = torch.split(params, weight_sizes + bias_sizes, dim=1)
    weights, biases = pieces[:3], pieces[3:]
    outs = [hidden, hidden, head_channels]
    x = features.reshape(1, batch * hidden, *features.shape[2:])
    for layer, (weight, bias, out) in enumerate(zip(weights, biases, outs)):
        kernel = weight.reshape(batch * out, -1, 1, 1, 1).to(x.dtype)
        x = F.conv3d(x, kernel, bias.reshape(batch * out).to(x.dtype), groups=batch)
        if layer < len(outs) - 1:
            x = F.relu(x)
    return x.reshape(batch, head_channels, *features.shape[2:])


class SigmoidLabelCoding(nn.Module):
    """Per task: merged labels <-> the task's sigmoid channels, and sigmoid logits -> class scores.

    Decisions (the paper only defines MOTS' [organ incl. tumour, tumour]):

    * channel ``k`` of task ``t`` belongs to the ``k``-th class the task annotates, ordered
      parents first, then by merged value; its target is "label is that class or a class nested
      in it" (a region). ``nested`` = {child name: parent name}; it applies to a task that
      annotates both (MOTS: ``tumour`` in ``organ``; a tumour-only task has one channel). With
      nothing nested every class has a mutually exclusive channel;
    * ``head_channels`` = the most classes any task annotates (paper: 2); channels past a task's
      classes are unannotated and excluded from its loss (as the paper's ``-1`` channels);
    * class scores (:meth:`class_logits`) for a class ``c`` whose chain of channels from its root
      down to its own is ``k_1 .. k_d``: ``s_c = sum_j min(z_k1, .., z_kj)``; background 0. Along
      a chain the increments ``min(..)`` never grow, so argmax descends while every channel on
      the way is positive: paper, organ if p_organ > 0.5 and tumour if additionally p_tumour >
      0.5 (a tumour outside the organ is not a tumour). Flat classes: argmax of (0, z_1, .., z_k),
      i.e. the most confident channel above 0.5. Scores are logits on the scale of ``z``, so
      nnU-Net's softmax, fp16 sums and fold averaging stay finite (averaging happens on these
      scores, not on sigmoid probabilities as the official sliding window does).

    Encoding then decoding is the identity on a task's labels (tested), because each channel
    region has exactly one class not covered by its children.
    """

    def __init__(self, task_map: TaskMap, nested: Mapping[str, str] | None = None):
        super().__init__()
        nested = dict(nested or {})
        labels = task_map.labels
        unknown = sorted(n for pair in nested.items() for n in pair if n not in labels)
        if unknown:
            raise TaskMapError(f"nested labels name {unknown}, which are not labels of the merged dataset "
                               f"{sorted(labels)}.")
        self.nested = nested
        self.num_classes = task_map.num_classes
        num_values = max(labels.values()) + 1
        names = {v: n for n, v in labels.items()}
        per_task = [self._task_channels(task.annotated_values, names, labels, nested) for task in task_map]
        self.head_channels = max(1, max(len(channels) for channels, _ in per_task))
        num_tasks, channels = len(per_task), self.head_channels
        regions = torch.zeros(num_tasks, channels, num_values, dtype=torch.bool)  # channel target per value
        valid = torch.zeros(num_tasks, channels, dtype=torch.bool)
        chain = torch.zeros(num_tasks, channels, channels, dtype=torch.bool)  # [k, j]: j is k or an ancestor
        owner = torch.zeros(num_tasks, self.num_classes, channels)  # [c, k]: class c's score is channel k's
        for t, (classes, parent) in enumerate(per_task):
            index = {value: k for k, value in enumerate(classes)}
            for k, value in enumerate(classes):
                valid[t, k] = True
                owner[t, value, k] = 1.0
                ancestor: int | None = value
                while ancestor is not None:
                    chain[t, k, index[ancestor]] = True
                    regions[t, index[ancestor], value] = True
                    ancestor = parent.get(ancestor)
        self.register_buffer("regions", regions, persistent=False)
        self.register_buffer("channel_valid", valid, persistent=False)
        self.register_buffer("chain", chain, persistent=False)
        self.register_buffer("owner", owner, persistent=False)
        self.task_classes = tuple(tuple(classes) for classes, _ in per_task)

    @staticmethod
    def _task_channels(annotated: Sequence[int], names: Mapping[int, str], labels: Mapping[str, int],
                       nested: Mapping[str, str]) -> tuple[list[int], dict[int, int]]:
        """The task's classes in channel order (parents first) and its child -> parent values."""
        parent = {labels[c]: labels[p] for c, p in nested.items() if labels[c] in annotated and labels[p] in annotated}

        def depth(value: int) -> int:
            seen = [value]
            while value in parent:
                value = parent[value]
                if value in seen:
                    raise TaskMapError(f"nested labels form a cycle: {[names[v] for v in seen + [value]]}")
                seen.append(value)
            return len(seen)

        return sorted(annotated, key=lambda v: (depth(v), v)), parent

    def _per_sample(self, table: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, tasks.to(table.device).long().view(-1))

    def encode(self, target: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged labels ``(B, 1, ...)`` -> binary channel targets ``(B, C, ...)`` (float) and the
        per-sample channel validity ``(B, C)``. Values outside a task's classes (background, other
        tasks' classes, ignore) are 0 in every channel; the loss masks ignore voxels itself."""
        regions = self._per_sample(self.regions, tasks)  # (B, C, V)
        values = target.long().clamp(0, regions.shape[-1] - 1).flatten(1)  # (B, N)
        encoded = torch.gather(regions, 2, values.unsqueeze(1).expand(-1, regions.shape[1], -1))
        return encoded.view(target.shape[0], regions.shape[1], *target.shape[2:]).float(), \
            self._per_sample(self.channel_valid, tasks)

    def class_logits(self, logits: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Sigmoid logits ``(B, C, ...)`` -> merged-class scores ``(B, num_classes, ...)``; classes the
        task does not annotate score 0 here (the network masks them afterwards)."""
        extra = (1,) * (logits.ndim - 2)
        chain = self._per_sample(self.chain, tasks).view(-1, *self.chain.shape[1:], *extra)  # (B, C_k, C_j, ...)
        # running min along each channel's chain: min over j in chain(k) of z_j
        z = logits.unsqueeze(1)  # (B, 1, C_j, ...)
        chain_min = z.masked_fill(~chain, float("inf")).amin(dim=2)  # (B, C_k, ...)
        chain_min = torch.where(self._per_sample(self.channel_valid, tasks).view(-1, logits.shape[1], *extra),
                                chain_min, torch.zeros_like(chain_min))
        scores = (chain.to(logits.dtype) * chain_min.unsqueeze(1)).sum(dim=2)  # sum over j in chain(k)
        owner = self._per_sample(self.owner, tasks).to(logits.dtype)  # (B, num_classes, C)
        return torch.einsum("bck,bk...->bc...", owner, scores)

    def decode(self, channels: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Binary channel maps -> merged labels ``(B, 1, ...)`` by the same rule as prediction."""
        return self.class_logits(channels.float() * 2 - 1, tasks).argmax(dim=1, keepdim=True)


def init_head_conditioning(network: TaskConditioning, num_tasks: int, head_channels: int,
                           coding: SigmoidLabelCoding | None) -> None:
    """Task conditioning of a dynamic-head network (DoDNet, TransDoDNet): with a label coding, eval
    mode masks the merged classes a task does not annotate; without one, outputs are head channels."""
    if coding is not None:
        if coding.head_channels != head_channels:
            raise ValueError(f"head_channels ({head_channels}) must equal the coding's {coding.head_channels}")
        annotated = [[k == 0 or k in classes for k in range(coding.num_classes)] for classes in coding.task_classes]
        network.init_task_conditioning(num_tasks, annotated, coding.num_classes)
    else:
        network.init_task_conditioning(num_tasks, None, head_channels)
    network.coding = coding
    network.keep_head_logits, network.last_head_logits = False, None


def name_preactivation_block(names: OfficialNames, block: ResidualBlock, prefix: str) -> None:
    """Official ``NoBottleneck`` names: ``gn1``, ``conv1``, ``gn2``, ``conv2``, ``downsample.{0,2}``."""
    for index, name in ((0, "gn1"), (2, "conv1"), (3, "gn2"), (5, "conv2")):
        names.add(block.body[index], f"{prefix}.{name}")
    if isinstance(block.shortcut, nn.Sequential):
        names.sequential(block.shortcut, f"{prefix}.downsample")


OFFICIAL_DECODER_BLOCKS = ("x1_resb", "x2_resb", "x4_resb", "x8_resb")  # full resolution first


class DoDNet(TaskConditioning, OfficialStateDict):
    """DoDNet; the task of the batch comes from ``set_task`` (``task_index``) or, optionally, per
    sample from the ``tasks`` forward argument (a ``(B,)`` tensor of task ids).

    ``strides``: one stride per stage, ``len(features)`` of them, the first (1, 1, 1); from
    nnU-Net's plans see :func:`strides_from_plans`. ``coding``: the merged label space of a
    multi-dataset (eval mode then returns class scores); without it outputs are always the
    ``head_channels`` sigmoid logits (the paper network)."""

    def __init__(self, input_channels: int = 1, num_tasks: int = MOTS_TASKS, head_channels: int = 2, *,
                 strides: Sequence[Sequence[int] | int] = PAPER_STRIDES, features: Sequence[int] = PAPER_FEATURES,
                 blocks: Sequence[int] = PAPER_BLOCKS, coding: SigmoidLabelCoding | None = None,
                 deep_supervision: bool = False):
        super().__init__()
        strides = as_strides(strides, 3)
        if not len(strides) == len(features) == len(blocks) >= 2:
            raise ValueError(f"strides, features and blocks need one entry per stage (>= 2 stages), got "
                             f"{len(strides)}, {len(features)}, {len(blocks)}")
        if any(len(s) != 3 for s in strides) or strides[0] != [1, 1, 1]:
            raise ValueError(f"strides must be 3D and start with [1, 1, 1] (the stem stage), got {strides}")
        if features[-1] != features[-2]:
            raise ValueError(f"the bottleneck is added to the last skip: features[-1] must equal features[-2], got "
                             f"{list(features)}")
        init_head_conditioning(self, num_tasks, head_channels, coding)
        self.input_channels, self.head_channels, self.strides = input_channels, head_channels, strides

        self.stem = WSConv3d(input_channels, features[0], 3, 1, 1, bias=False)
        self.stages = nn.ModuleList(_stage(features[max(i - 1, 0)], features[i], blocks[i], strides[i])
                                    for i in range(len(features)))
        self.fusion = nn.Sequential(*_pre_activation(features[-1]), WSConv3d(features[-1], features[-1], 1, bias=False))
        self.decoder = DoDNetDecoder(features)
        self.decoder.deep_supervision = deep_supervision
        self.pool = nn.Sequential(*_pre_activation(features[-1]), nn.AdaptiveAvgPool3d(1))
        weight_sizes, bias_sizes = dynamic_head_sizes(head_channels)
        self.controller = nn.Conv3d(features[-1] + num_tasks, sum(weight_sizes) + sum(bias_sizes), 1)

    def head_logits(self, x: torch.Tensor, tasks: torch.Tensor | None = None) -> torch.Tensor:
        """The per-task sigmoid logits ``(B, head_channels, ...)`` in any mode."""
        if x.shape[1] != self.input_channels:
            raise ValueError(f"{type(self).__name__} expects {self.input_channels} input channels (the merged "
                             f"dataset's; tasks with fewer are zero-padded), got {x.shape[1]}")
        tasks = self._tasks(x.shape[0], tasks)
        return self._task_head(self._shared_features(x), tasks)

    def _shared_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What every task shares: the decoder's pre-class features and the pooled fused bottleneck."""
        skips = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        x = self.fusion(skips.pop())
        return self.decoder(x, skips), self.pool(x)

    def _task_head(self, shared: tuple[torch.Tensor, torch.Tensor], tasks: torch.Tensor) -> torch.Tensor:
        """The tasks' dynamic heads on the shared features: the only per-task compute."""
        features, pooled = shared
        task_code = F.one_hot(tasks, self.num_tasks).to(pooled.dtype).view(pooled.shape[0], self.num_tasks, 1, 1, 1)
        params = self.controller(torch.cat((pooled, task_code), 1)).flatten(1)
        return dynamic_head(features, params, self.head_channels)

    def official_weights_problem(self) -> str | None:
        if len(self.stages) != len(PAPER_FEATURES):
            return f"the official DoDNet has {len(PAPER_FEATURES)} stages; this one has {len(self.stages)}"
        return None

    def _official_names(self) -> OfficialNames:
        """Names of the official ``unet3D`` (``a_DynConv/unet3D_DynConv882.py``)."""
        names = OfficialNames()
        names.add(self.stem, "conv1")
        for index, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                name_preactivation_block(names, block, f"layer{index}.{b}")
        names.sequential(self.fusion, "fusionConv")
        for name, block in zip(OFFICIAL_DECODER_BLOCKS, self.decoder.blocks):
            name_preactivation_block(names, block, f"{name}.0")
        names.sequential(self.decoder.precls, "precls_conv")
        names.sequential(self.pool, "GAP")
        names.add(self.controller, "controller")
        return names

    def _tasks(self, batch: int, tasks: torch.Tensor | None) -> torch.Tensor:
        if tasks is None:
            self.require_task()
            return self.task_index.expand(batch)  # a tensor: no GPU sync, no recompilation per task
        tasks = torch.as_tensor(tasks, device=self.task_index.device).long().view(-1)
        if tasks.numel() != batch:
            raise ValueError(f"tasks needs one task id per sample ({batch}), got {tasks.numel()}")
        return tasks

    def forward(self, x: torch.Tensor, tasks: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head_logits(x, tasks)
        if self.keep_head_logits:  # the trainer's validation loss needs them next to the class scores
            self.last_head_logits = logits
        if self.training or self.coding is None:
            return logits
        # eval mode: merged-class scores, each sample's unannotated classes masked (by its own task)
        return self._class_scores(logits, self._tasks(x.shape[0], tasks))

    def _class_scores(self, logits: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        return self.mask_unannotated(self.coding.class_logits(logits, tasks), tasks)

    def forward_tasks(self, x: torch.Tensor, task_ids: Sequence[int]) -> list[torch.Tensor]:
        """``[set_task(t); forward(x) for t in task_ids]`` from ONE pass of the shared network: only the
        controller and the dynamic head run per task (``nnunet-ext predict --task all``). Each output is
        computed by the same operations on the same shared tensors as the single-task forward, so the
        two are equal; the task set before the call is restored."""
        shared = self._shared_features(x)
        previous, was_set = self.task_index.clone(), self.task_is_set
        outputs = []
        try:
            for task_id in task_ids:
                self.set_task(task_id)
                tasks = self._tasks(x.shape[0], None)
                logits = self._task_head(shared, tasks)
                outputs.append(logits if self.training or self.coding is None else self._class_scores(logits, tasks))
        finally:
            self.task_index.copy_(previous)
            self.task_is_set = was_set
        return outputs


def strides_from_plans(plan_strides: Sequence[Sequence[int] | int],
                       stages: int = len(PAPER_FEATURES)) -> list[list[int]]:
    """DoDNet's per-stage strides from nnU-Net's plans: the plans' first ``stages`` strides
    (their first is the stride-1 stem stage), padded with stride 1 when the plans have fewer
    stages (:func:`~nnunet_ext.architectures.blocks.topology.leading_strides`). The depth and widths
    stay the paper's, so with >= 5 planned stages the layers and the parameter count are the paper's
    whatever the plans; only the downsampling follows the plans' (anisotropic) choice. A padded
    stride-1 stage keeps its blocks but, by the official rule (projection only where stride or width
    changes), has an identity first shortcut."""
    return leading_strides(plan_strides, stages)


def paper_dodnet() -> DoDNet:
    """MOTS configuration: 7 tasks, 1 CT channel, 2 sigmoid channels, official strides
    (patch 64x192x192)."""
    return DoDNet(input_channels=1, num_tasks=MOTS_TASKS, head_channels=2)
