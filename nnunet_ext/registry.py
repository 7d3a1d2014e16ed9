"""The one list of what nnunet-ext provides: methods, their trainers, networks and planners.

Everything else (trainer discovery, ``nnunet-ext list``, the network registry, the parameter
benchmark, the parametrised tests) reads this list, so adding a method is one entry here plus
its own modules. Entries name classes by import path, as strings: reading the registry imports
nothing heavy, which keeps ``nnunet-ext list`` and start-up fast.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


#: ``paper_network(name, conventions)``: "default" = ours (where we deliberately differ, e.g. the
#: corrected axis order); "official" = the official implementation's choices, so that its weights load.
CONVENTIONS: tuple[str, ...] = ("default", "official")


@dataclass(frozen=True)
class PaperNetwork:
    """A network in the configuration of its paper (channels, classes, patch size)."""

    name: str
    builder: str  # "module:function" returning the torch module; no arguments = default conventions
    paper_parameters: int | None  # the official implementation's count; None where it has none
    configuration: str  # human-readable: which dataset configuration the builder reproduces
    parameters: int  # exact count of the network built by ``builder()`` (default conventions)
    official_parameters: int  # exact count with conventions="official"
    # builder keywords for conventions="official"; () = the default network already is the official one
    official_kwargs: tuple[tuple[str, str], ...] = ()
    trainable_parameters: int | None = None  # where part of the network is frozen


@dataclass(frozen=True)
class Method:
    key: str
    title: str
    paper: str
    trainers: tuple[str, ...] = ()  # "module:Class"
    networks: tuple[PaperNetwork, ...] = ()
    planners: tuple[str, ...] = ()  # "module:Class"
    notes: str = field(default="")


METHODS: tuple[Method, ...] = (
    Method(
        key="base",
        title="nnU-Net (nnunet-ext base)",
        paper="Isensee et al., nnU-Net: a self-configuring method for deep learning-based "
              "biomedical image segmentation, Nature Methods 2021",
        trainers=("nnunet_ext.trainers.base:nnUNetExtTrainer",),
        planners=("nnunet_ext.plans.cpu_demo:CPUDemoPlanner",),
        notes="nnU-Net's default trainer plus short-run variables and method state in checkpoints; "
              "the base class of every nnunet-ext trainer",
    ),
    Method(
        key="cotr",
        title="CoTr",
        paper="Xie et al., CoTr: Efficiently Bridging CNN and Transformer for 3D Medical Image Segmentation, "
              "MICCAI 2021",
        trainers=("nnunet_ext.trainers.cotr:CoTrTrainer",),
        planners=("nnunet_ext.plans.cotr:CoTrPlanner",),
        networks=(PaperNetwork("CoTr", "nnunet_ext.architectures.cotr:paper_cotr", 41_872_504,
                               "BCV: 1 input channel, 14 classes, patch 48x192x192",
                               parameters=41_872_504, official_parameters=41_872_504,
                               official_kwargs=(("axis_order", "official"),)),),
        notes="CNN encoder + deformable transformer (DeTrans) + CNN decoder",
    ),
    Method(
        key="universal",
        title="Universal (multi-dataset) nnU-Net",
        paper="nnU-Net trained on several partially labelled datasets merged with `nnunet-ext merge`: "
              "task-aware batches and partial-label loss (the data layer of UniSeg and DoDNet)",
        trainers=("nnunet_ext.trainers.universal:nnUNetUniversalTrainer",),
        notes="baseline for the universal methods; predict with `nnunet-ext predict --task NAME`",
    ),
    Method(
        key="banet",
        title="BA-Net",
        paper="Hu et al., Boundary-Aware Network for Kidney Parsing (KiPA22) / abdominal multi-organ "
              "segmentation (AMOS22), github.com/ShishuaiHu/BA-Net",
        trainers=("nnunet_ext.trainers.banet:BANetTrainer",),
        # paper: about 48.4 M; 48,366,848 counted by instantiating the official generic_BANetV2
        networks=(PaperNetwork("BANet", "nnunet_ext.architectures.banet:paper_banet", 48_366_848,
                               "KiPA22: 1 input channel, 5 classes, nnU-Net 3d_fullres default topology for a "
                               "128x128x128 patch", parameters=48_368_483, official_parameters=48_366_848,
                               official_kwargs=(("conventions", "official"),)),),
        notes="nnU-Net U-Net + boundary decoder; boundary probability modulates every segmentation decoder stage",
    ),
    Method(
        key="uniseg",
        title="UniSeg",
        paper="Ye et al., UniSeg: A Prompt-driven Universal Segmentation Model as well as A Strong Representation "
              "Learner, MICCAI 2023",
        trainers=("nnunet_ext.trainers.uniseg:UniSegTrainer",),
        networks=(PaperNetwork("UniSeg", "nnunet_ext.architectures.uniseg:paper_uniseg", 32_114_381,
                               "11 tasks (1, 2 or 4 input channels), 4-channel shared head, patch 64x192x192",
                               parameters=32_059_905, official_parameters=32_114_381,
                               official_kwargs=(("conventions", "official"),)),),
        notes="nnU-Net U-Net with one input conv per channel count and a learned universal prompt fused with the "
              "bottleneck (FUSE); the task's prompt channel conditions the decoder; predict with "
              "`nnunet-ext predict --task NAME`",
    ),
    Method(
        key="mcnet",
        title="MC-Net+",
        paper="Wu et al., Mutual consistency learning for semi-supervised medical image segmentation, MedIA 2022",
        trainers=("nnunet_ext.trainers.mcnet:MCNetPlusTrainer",),
        networks=(PaperNetwork("MCNetPlus", "nnunet_ext.architectures.mcnet:paper_mcnet", 15_246_566,
                               "LA: 1 channel, 2 classes, patch 112x112x80, 3 decoders",
                               parameters=15_246_566, official_parameters=15_246_566),),
        notes="semi-supervised (labelled + unlabelled batches): V-Net encoder and three decoders differing only in "
              "upsampling (transposed conv, trilinear, nearest); Dice on labelled patches + mutual consistency "
              "between each decoder's probabilities and the others' sharpened ones; inference uses decoder 1",
    ),
    Method(
        key="lefed",
        title="LeFeD",
        paper="Zeng, Xie, Lu, Lu, Zhang, Xia, Consistency-Guided Differential Decoding for Enhancing Semi-Supervised "
              "Medical Image Segmentation, IEEE TMI 2025 (arXiv 2309.14819: Discrepancy Matters: Learning from "
              "Inconsistent Decoder Features for Consistent Semi-supervised Medical Image Segmentation), "
              "github.com/maxwell0027/LeFeD",
        trainers=("nnunet_ext.trainers.lefed:LeFeDTrainer",),
        networks=(PaperNetwork("LeFeD", "nnunet_ext.architectures.lefed:paper_lefed", 12_348_718,
                               "LA: 1 channel, 2 classes, 2 decoders + 5 side heads",
                               parameters=12_348_718, official_parameters=12_348_718),),
        notes="semi-supervised (labelled + unlabelled batches): V-Net encoder, transposed-conv and trilinear "
              "decoders, decoder 2 gated by decoder 1; 3 passes per batch feeding the decoders' feature "
              "discrepancy back into the encoder; inference uses decoder 1",
    ),
    Method(
        key="dodnet",
        title="DoDNet",
        paper="Zhang et al., DoDNet: Learning to segment multi-organ and tumors from multiple partially labeled "
              "datasets, CVPR 2021",
        trainers=("nnunet_ext.trainers.dodnet:DoDNetTrainer",),
        networks=(PaperNetwork("DoDNet", "nnunet_ext.architectures.dodnet:paper_dodnet", 17_329_528,
                               "MOTS: 7 tasks, 1 channel, 64x192x192 patch",
                               parameters=17_329_528, official_parameters=17_329_528),),
        notes="residual WS-conv/GroupNorm 3D U-Net; a controller (pooled bottleneck + one-hot task) generates "
              "each sample's 8->8->8->2 dynamic head; per-task sigmoid channels (one per annotated class, nested "
              "classes via NNUNET_EXT_NESTED_LABELS), merged-class scores in eval mode; predict with "
              "`nnunet-ext predict --task NAME`",
    ),
    Method(
        key="transdodnet",
        title="TransDoDNet",
        paper="Xie et al., Learning from partially labeled data for multi-organ and tumor segmentation "
              "(TransDoDNet), TPAMI 2023",
        trainers=("nnunet_ext.trainers.transdodnet:TransDoDNetTrainer",),
        # the paper gives none; 39,049,941 counted by instantiating the official TransDoD model
        networks=(PaperNetwork("TransDoDNet", "nnunet_ext.architectures.transdodnet:paper_transdodnet",
                               39_049_941, "MOTS: 7 tasks, 1 channel, 64x192x192 patch",
                               parameters=39_049_941, official_parameters=39_049_941,
                               official_kwargs=(("axis_order", "official"),)),),
        notes="3D ResNet-50 + deformable transformer (3 encoder layers over 3 levels, 3 decoder layers of task "
              "queries); each task query's controller output is DoDNet's 8->8->8->2 dynamic head on a CNN "
              "decoder; DoDNet's label coding and loss; AdamW 2e-4, warm-up + poly, clipping 0.1; predict with "
              "`nnunet-ext predict --task NAME`",
    ),
    Method(
        key="class_sam",
        title="ClassSAM (SurgicalSAM)",
        paper="Yue et al., SurgicalSAM: Efficient Class Promptable Surgical Instrument Segmentation, AAAI 2024, "
              "github.com/wenxi-yue/SurgicalSAM (SAM: Kirillov et al., Segment Anything, ICCV 2023)",
        trainers=("nnunet_ext.trainers.class_sam:ClassSAMTrainer",),
        # paper None: SurgicalSAM's "about 4.65 M" counts the trainable part only; ours: 4,518,114 trainable
        # of 641,677,798 (frozen vit_h encoder). The official convention has the same layers; it differs in
        # the preprocessing (SurgicalSAM's uint8 frame and SAM's ResizeLongestSide on rgb_to_0_1 channels).
        networks=(PaperNetwork("ClassSAM", "nnunet_ext.architectures.class_sam:paper_class_sam", None,
                               "SurgicalSAM: vit_h image encoder, 7 classes", parameters=641_677_798,
                               official_parameters=641_677_798, trainable_parameters=4_518_114,
                               official_kwargs=(("conventions", "official"),)),),
        notes="2d configuration: frozen SAM image encoder, prototype-based class prompt encoder (dense + sparse "
              "prompts), fine-tuned SAM mask decoder run once per class, background logit 0; Dice + contrastive "
              "prototype loss; SAM checkpoint from NNUNET_EXT_SAM_CHECKPOINT (never downloaded); optional on-disk "
              "embedding cache (NNUNET_EXT_SAM_CACHE)",
    ),
)


def class_name(import_path: str) -> str:
    return import_path.rsplit(":", 1)[1]


def trainer_paths() -> dict[str, str]:
    """Trainer class name -> "module:Class" for every registered trainer."""
    return {class_name(path): path for method in METHODS for path in method.trainers}


def planner_paths() -> dict[str, str]:
    return {class_name(path): path for method in METHODS for path in method.planners}


def paper_networks() -> dict[str, PaperNetwork]:
    return {network.name: network for method in METHODS for network in method.networks}


def method_of(class_or_network_name: str) -> Method | None:
    for method in METHODS:
        names = [class_name(p) for p in method.trainers + method.planners] + [n.name for n in method.networks]
        if class_or_network_name in names:
            return method
    return None


def import_object(import_path: str):
    """Import "package.module:Name" and return the object."""
    import importlib

    module_name, _, attribute = import_path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """Error text for an unknown trainer/planner/network name, listing the close matches."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if not close:
        close = [k for k in known if name.lower() in k.lower() or k.lower() in name.lower()]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown {kind} '{name}'.{hint} Known {kind}s: {', '.join(sorted(known)) or '(none)'}."
