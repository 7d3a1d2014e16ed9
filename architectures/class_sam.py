"""ClassSAM: SAM with SurgicalSAM's prototype-based class prompts, as an nnU-Net v2 2d network.

Yue et al., "SurgicalSAM: Efficient Class Promptable Surgical Instrument Segmentation", AAAI 2024;
official code github.com/wenxi-yue/SurgicalSAM (``surgicalSAM/model.py``, ``model_forward.py``,
``train.py``). SAM itself (image encoder, mask decoder, positional encoding) is built from the
``segment_anything`` package's own modules; only the class prompt encoder is written here. That package
is the optional ``sam`` extra (``pip install "nnunet-ext[sam]"``): it is imported when a SAM network
is built (:func:`segment_anything_modeling`), not when this module is imported, and a missing one is
a one-line :class:`~nnunet_ext.errors.UserFacingError` naming the extra.

Network (``forward(x)``: nnU-Net's 2d patch ``(B, C, H, W)`` -> logits ``(B, 1 + K, H, W)``)
------------------------------------------------------------------------------------------
1. SAM input (:meth:`ClassSAM.to_sam_input`). nnU-Net hands over z-scored channels; SAM expects
   an RGB image in [0, 255] normalised with its ``pixel_mean``/``pixel_std``. Channels: SAM's
   three input channels take the input channels ``channel_indices`` (default: channel ``i % C``
   for SAM channel ``i``, so one channel is repeated three times, three channels are used as
   they are, and channels beyond the third are not seen). Intensities: a fixed map
   ``z -> 255 * (clamp(z, -r, r) + r) / (2 r)`` with ``r = intensity_range`` (3 standard
   deviations), not a per-image min-max: the map must not depend on the patch content, because
   nnU-Net predicts a slice as overlapping tiles and trains on random crops, and a cached
   embedding (see the trainer) must equal the one the live network would compute. Then SAM's own
   geometry: the longest side is resized to the encoder's ``img_size`` (bilinear, antialiased
   when shrinking), the rest padded with zeros at the bottom/right.
2. Frozen image encoder (SAM ``ImageEncoderViT``, ``requires_grad=False``, run under
   ``torch.no_grad``) -> image embedding ``(B, 256, 64, 64)`` at vit_b/l/h.
3. Class prompt encoder (:class:`ClassPromptEncoder`, official ``Prototype_Prompt_Encoder``):
   one learnable 256-d prototype per foreground class. For class ``k`` the class-activated
   feature is ``f + f * (f . p_k)`` at every embedding position; a 1x1-conv MLP of it is the
   dense prompt (added to the image embedding by SAM's decoder) and an MLP across the positions
   (``Conv1d`` over the ``64*64`` positions) gives ``num_tokens`` sparse tokens per class. The
   decoder run for class ``k`` gets the tokens of all classes, class ``k``'s marked with the
   positive and the others with the negative embedding (frozen, initialised from SAM's
   positive/negative point embeddings), as the official code.
4. SAM's mask decoder (fine-tuned), once per class, batched over classes (one call per image,
   because SAM's decoder repeats one image embedding per prompt), single-mask output ->
   ``(B, K, 256, 256)`` low-resolution logits; SAM's postprocessing maps them back: upsample to
   ``img_size``, crop the unpadded region, resize to the patch size.
5. nnU-Net-style logits: channel 0 is a constant 0 (background), channel ``k`` the mask logit of
   class ``k``. Softmax/argmax over these (nnU-Net's predictor and evaluation, unchanged) gives
   background exactly where every class's sigmoid is below 0.5 - SurgicalSAM's threshold 0 - and
   otherwise the class with the largest logit. (SurgicalSAM resolves overlaps between its binary
   masks by the decoder's predicted mask quality per mask; per pixel the largest logit is what
   a softmax predictor can do.) The loss (``nnunet_ext.losses.class_prompt``) trains the
   foreground channels as independent sigmoid masks, as SAM's decoder was trained.

Trainable parts (about 4.65 M at SurgicalSAM's configuration): prototypes, the class prompt
encoder's MLPs and SAM's mask decoder except its IoU head. The IoU (mask quality) head is frozen:
SurgicalSAM's loss never uses it, so it received no gradient there either and stayed at SAM's
weights; keeping it trainable would hand nnU-Net's DDP a parameter without gradient (an error
there). :func:`paper_class_sam` (vit_h, 7 classes, 2 tokens): 4,518,114 trainable parameters,
4,650,726 in the official optimiser (the difference is exactly the IoU head's 132,612),
641,677,798 in total.

No deep supervision: one output. ``decoder`` is the mask decoder, so nnU-Net's
``network.decoder.deep_supervision = x`` works; the flag changes nothing.

Conventions (``conventions``, settable in the plans' ``nnunet_ext_class_sam``): the network after
step 1 is SurgicalSAM's (decoder and prompt path equal to the official code); step 1 is ours by
default. ``conventions="official"`` replaces it by SurgicalSAM's own preprocessing
(``tools/data_preprocess.py``: ``SamPredictor.set_image`` on the RGB frame): the input channels are
nnU-Net's ``rgb_to_0_1`` normalisation of the RGB frame (``x / 255``), turned back into the uint8
frame (``round(255 x)``), resized by SAM's own ``ResizeLongestSide`` (PIL's antialiased bilinear
resize of the uint8 image, rounded to uint8, on the CPU) and only then normalised and padded. The
default differs twice: its intensities are the fixed z-score map above (SAM then sees a
contrast-changed frame), and its resize is a float resize (up to one grey level from PIL's uint8
result on the same frame). The official convention gives SAM exactly the official input, but
needs the ``rgb_to_0_1`` channel normalisation (dataset.json ``channel_names``), not z-scores
(``ClassSAMTrainer`` refuses plans that normalise the channels SAM sees otherwise); the default
works on any channels. The PIL resize runs on the CPU (a round trip from a GPU) and is one
``torch.compiler.disable``'d call (:func:`resize_longest_side`).

The official weights (:meth:`ClassSAM.official_key_map`): SurgicalSAM's ``model_ckp.pth``
(``prototype_prompt_encoder_state_dict``, ``sam_decoder_state_dict``, ``prototypes_state_dict``,
flattened with those names as prefixes) plus the SAM checkpoint's ``image_encoder.*`` and
``prompt_encoder.pe_layer.*``, which SurgicalSAM keeps frozen and does not save.

Weights: the constructor initialises randomly (no download, no checkpoint needed);
:func:`load_sam_checkpoint` loads an official SAM checkpoint (``sam_vit_h_4b8939.pth``, ...) with
``torch.load(..., weights_only=True)``: image encoder, mask decoder, the positional encoding and
the point embeddings that initialise the positive/negative class marks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.architectures.blocks.nnunet_v1 import OfficialNames, OfficialStateDict, check_conventions
from nnunet_ext.errors import UserFacingError

if TYPE_CHECKING:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, Sam

SAM_EXTRA_MISSING = 'ClassSAMTrainer needs segment-anything: pip install "nnunet-ext[sam]"'


def segment_anything_modeling():
    """``segment_anything.modeling`` (the ``sam`` extra), imported on first use; a one-line
    UserFacingError naming the extra when the package is not installed."""
    try:
        from segment_anything import modeling
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "segment_anything":
            raise  # installed, but one of its own imports fails: show that
        raise UserFacingError(SAM_EXTRA_MISSING) from None
    return modeling



class ClassSAMInputError(UserFacingError, ValueError):
    """ClassSAM's settings or inputs do not fit (a ValueError for callers, one line for users)."""


SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
CHECKPOINT_VARIABLE = "NNUNET_EXT_SAM_CHECKPOINT"
MODEL_TYPE_VARIABLE = "NNUNET_EXT_SAM_MODEL_TYPE"


@dataclass(frozen=True)
class SamSpec:
    """Sizes of one SAM variant (segment_anything's ``build_sam_vit_*`` values)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


SAM_SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11)),
    # for tests and CPU benchmarks only: no official checkpoint exists for it
    "tiny": SamSpec(32, 2, 2, (1,), image_size=64, window_size=2, prompt_embed_dim=32, decoder_depth=1,
                    decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32),
}


def sam_spec(model_type: str) -> SamSpec:
    if model_type not in SAM_SPECS:
        raise UserFacingError(f"Unknown SAM model type {model_type!r}; use one of {', '.join(SAM_SPECS)} "
                              f"(set {MODEL_TYPE_VARIABLE}; 'tiny' is a random test model without a checkpoint).")
    return SAM_SPECS[model_type]


def sam_frame(height: int, width: int, image_size: int) -> tuple[int, int]:
    """Size of a ``height x width`` image after SAM's resize of the longest side to ``image_size``."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@torch.compiler.disable  # PIL on the CPU: one graph break under torch.compile, not one per PIL call
def resize_longest_side(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """segment_anything's ``ResizeLongestSide(image_size).apply_image`` (PIL's antialiased bilinear resize
    of the uint8 image) on each image of a uint8 batch ``(B, 3, H, W)``; same layout and device back."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resize = ResizeLongestSide(image_size)
    frames = [torch.from_numpy(resize.apply_image(image)) for image in pixels.permute(0, 2, 3, 1).cpu().numpy()]
    return torch.stack(frames).permute(0, 3, 1, 2).contiguous().to(pixels.device)


def default_channel_indices(input_channels: int) -> tuple[int, int, int]:
    """SAM channel ``i`` <- input channel ``i % C``: 1 channel repeated, 3 channels as they are."""
    return tuple(i % input_channels for i in range(3))


def sam_image_encoder(spec: SamSpec) -> ImageEncoderViT:
    """segment_anything's image encoder at ``spec`` (random weights)."""
    return segment_anything_modeling().ImageEncoderViT(
        depth=spec.encoder_depth, embed_dim=spec.encoder_embed_dim, img_size=spec.image_size,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec.encoder_num_heads,
        patch_size=spec.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=spec.encoder_global_attn_indexes, window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim)


def sam_mask_decoder(spec: SamSpec) -> MaskDecoder:
    """segment_anything's mask decoder at ``spec`` (random weights)."""
    modeling = segment_anything_modeling()
    transformer = modeling.TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.prompt_embed_dim,
                                             mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_num_heads)
    return modeling.MaskDecoder(num_multimask_outputs=3, transformer=transformer,
                                transformer_dim=spec.prompt_embed_dim, iou_head_depth=3,
                                iou_head_hidden_dim=spec.iou_head_hidden_dim)


def build_sam(model_type: str) -> Sam:
    """segment_anything's whole ``Sam`` at ``SAM_SPECS[model_type]``, randomly initialised: the layout
    of an official checkpoint (tests and benchmarks write their own checkpoints with it)."""
    spec, modeling = sam_spec(model_type), segment_anything_modeling()
    size, embedding = spec.image_size, spec.embedding_size
    prompt_encoder = modeling.PromptEncoder(embed_dim=spec.prompt_embed_dim,
                                            image_embedding_size=(embedding, embedding),
                                            input_image_size=(size, size), mask_in_chans=16)
    return modeling.Sam(image_encoder=sam_image_encoder(spec), prompt_encoder=prompt_encoder,
                        mask_decoder=sam_mask_decoder(spec), pixel_mean=list(SAM_PIXEL_MEAN),
                        pixel_std=list(SAM_PIXEL_STD))


class ClassPromptEncoder(nn.Module):
    """SurgicalSAM's prototype-based class prompt encoder (official ``Prototype_Prompt_Encoder`` +
    ``Learnable_Prototypes``), computed for every class at once.

    ``forward(image_embeddings (B, D, E, E))`` -> dense ``(B, K, D, E, E)``, sparse
    ``(B, K, K * num_tokens, D)``: the prompts of the decoder run for each class ``k``.
    """

    def __init__(self, num_classes: int, embed_dim: int, embedding_size: int, num_tokens: int = 2,
                 hidden_dim_dense: int = 128, hidden_dim_sparse: int = 128):
        super().__init__()
        self.num_classes, self.num_tokens = num_classes, num_tokens
        self.prototypes = nn.Embedding(num_classes, embed_dim)
        self.dense = nn.Sequential(nn.Conv2d(embed_dim, hidden_dim_dense, 1), nn.ReLU(),
                                   nn.Conv2d(hidden_dim_dense, embed_dim, 1))
        # an MLP across the E*E positions, shared by the D feature channels (official Conv1d(size*size, ...))
        positions = embedding_size * embedding_size
        self.sparse = nn.Sequential(nn.Conv1d(positions, hidden_dim_sparse, 1), nn.ReLU(),
                                    nn.Conv1d(hidden_dim_sparse, num_tokens, 1))
        # which class a token belongs to relative to the prompted one; frozen, from SAM's point labels
        self.negative = nn.Embedding(num_tokens, embed_dim).requires_grad_(False)
        self.positive = nn.Embedding(num_tokens, embed_dim).requires_grad_(False)

    def activated_features(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """``f + f * (f . p_k)`` per class: ``(B, K, E*E, D)``."""
        features = image_embeddings.flatten(2).transpose(1, 2)  # (B, E*E, D)
        similarity = features @ self.prototypes.weight.t()  # (B, E*E, K)
        return features.unsqueeze(1) * (1 + similarity.transpose(1, 2).unsqueeze(-1))

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, dim, height, width = image_embeddings.shape
        classes, tokens = self.num_classes, self.num_tokens
        activated = self.activated_features(image_embeddings).flatten(0, 1)  # (B*K, E*E, D)
        dense = self.dense(activated.transpose(1, 2).reshape(batch * classes, dim, height, width))
        sparse = self.sparse(activated).view(batch, 1, classes, tokens, dim)  # per class, shared by all runs
        prompted = torch.eye(classes, device=image_embeddings.device, dtype=sparse.dtype)[:, :, None, None]
        marks = prompted * self.positive.weight + (1 - prompted) * self.negative.weight  # (K run, K class, n, D)
        sparse = (sparse + marks).reshape(batch, classes, classes * tokens, dim)
        return dense.view(batch, classes, dim, height, width), sparse


class ClassSAM(OfficialStateDict, nn.Module):
    """SAM with class prompts: nnU-Net 2d patches in, one background + one logit map per class out.

    Keyword arguments (all JSON, so plans can hold them): ``sam_model_type`` (vit_b, vit_l,
    vit_h, or tiny for tests), ``num_tokens`` (sparse tokens per class; official 2 for EndoVis2018,
    4 for EndoVis2017), ``hidden_dim_dense``/``hidden_dim_sparse`` (official 128),
    ``channel_indices`` (input channel for each of SAM's 3; default ``i % C``),
    ``intensity_range`` (z-scores mapped to [0, 255] over +-this), ``conventions`` (``"default"``, or
    ``"official"``: SurgicalSAM's preprocessing of ``rgb_to_0_1`` channels, module docstring).
    ``num_classes`` counts the background, as nnU-Net's ``num_segmentation_heads``.
    """

    def __init__(self, input_channels: int, num_classes: int, sam_model_type: str = "vit_h", num_tokens: int = 2,
                 hidden_dim_dense: int = 128, hidden_dim_sparse: int = 128,
                 channel_indices: Sequence[int] | None = None, intensity_range: float = 3.0,
                 deep_supervision: bool = False, conventions: str = "default"):
        super().__init__()
        self.conventions = check_conventions(conventions)
        if num_classes < 2:
            raise ClassSAMInputError(f"ClassSAM needs background + at least one class, got num_classes={num_classes}; "
                                     f"dataset.json's 'labels' must list at least one foreground label.")
        channels = tuple(channel_indices) if channel_indices is not None else default_channel_indices(input_channels)
        if len(channels) != 3 or not all(isinstance(c, int) and 0 <= c < input_channels for c in channels):
            raise ClassSAMInputError(
                f"channel_indices must name 3 of the {input_channels} input channels (0 to {input_channels - 1}), "
                f"got {channels}. Fix 'channel_indices' in the plans' nnunet_ext_class_sam (null: the default).")
        self.sam_model_type, self.spec = sam_model_type, sam_spec(sam_model_type)
        self.channel_indices, self.intensity_range = channels, float(intensity_range)
        spec, dim = self.spec, self.spec.prompt_embed_dim
        self.image_encoder = sam_image_encoder(spec).requires_grad_(False)
        # SAM's prompt encoder's positional encoding, loaded from the checkpoint
        self.pe_layer = segment_anything_modeling().prompt_encoder.PositionEmbeddingRandom(dim // 2)
        self.prompt_encoder = ClassPromptEncoder(num_classes - 1, dim, spec.embedding_size, num_tokens,
                                                 hidden_dim_dense, hidden_dim_sparse)
        self.mask_decoder = sam_mask_decoder(spec)
        self.mask_decoder.iou_prediction_head.requires_grad_(False)  # unused by the loss (module docstring)
        self.mask_decoder.deep_supervision = deep_supervision  # nnU-Net's switch; one output either way
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def decoder(self) -> nn.Module:
        return self.mask_decoder

    @property
    def prototypes(self) -> torch.Tensor:
        return self.prompt_encoder.prototypes.weight

    # --- pieces of forward ------------------------------------------------------------------
    def to_sam_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """nnU-Net patch -> SAM's normalised, resized and padded 3-channel image, and the resized size."""
        if x.ndim != 4 or x.shape[1] <= max(self.channel_indices) or min(x.shape[-2:]) < 1:
            raise ClassSAMInputError(
                f"ClassSAM takes 2D patches (batch, channels >= {max(self.channel_indices) + 1}, y, x); got a tensor "
                f"of shape {tuple(x.shape)}. Train and predict with nnU-Net's 2d configuration on data with the "
                f"channels of the dataset it was built for.")
        size = self.spec.image_size
        if self.conventions == "official":
            return self.official_sam_input(x)
        r = self.intensity_range
        pixels = (x[:, list(self.channel_indices)].float().clamp(-r, r) + r) * (255.0 / (2 * r))
        image = (pixels - self.pixel_mean) / self.pixel_std
        frame = sam_frame(x.shape[-2], x.shape[-1], size)
        if frame != tuple(x.shape[-2:]):
            shrinking = frame[0] < x.shape[-2] or frame[1] < x.shape[-1]
            image = F.interpolate(image, size=frame, mode="bilinear", align_corners=False, antialias=shrinking)
        return F.pad(image, (0, size - frame[1], 0, size - frame[0])), frame

    def official_sam_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """SurgicalSAM's ``SamPredictor.set_image``: ``rgb_to_0_1`` channels -> the uint8 frame -> SAM's
        ``ResizeLongestSide`` (PIL, uint8) -> SAM's normalisation and padding."""
        size = self.spec.image_size
        pixels = (x[:, list(self.channel_indices)].float() * 255).round().clamp(0, 255).to(torch.uint8)
        frame = sam_frame(x.shape[-2], x.shape[-1], size)
        if frame != tuple(x.shape[-2:]):
            pixels = resize_longest_side(pixels, size)
        image = (pixels.float() - self.pixel_mean) / self.pixel_std
        return F.pad(image, (0, size - frame[1], 0, size - frame[0])), frame

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen image encoder: nnU-Net patch -> image embedding ``(B, D, E, E)`` (no autograd graph)."""
        with torch.no_grad():
            return self.image_encoder(self.to_sam_input(x)[0])

    def decode(self, image_embeddings: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """Class prompts + mask decoder: image embedding -> nnU-Net logits at ``output_size``."""
        spec = self.spec
        expected = (spec.prompt_embed_dim, spec.embedding_size, spec.embedding_size)
        if image_embeddings.ndim != 4 or tuple(image_embeddings.shape[1:]) != expected:
            raise ClassSAMInputError(
                f"image embeddings of shape {tuple(image_embeddings.shape)} do not fit ClassSAM "
                f"{self.sam_model_type}, which needs (batch, {', '.join(map(str, expected))}). Were they (an embedding "
                f"cache) computed by another SAM model type? Compute them again with this one.")
        dense, sparse = self.prompt_encoder(image_embeddings)
        position = self.pe_layer(image_embeddings.shape[-2:]).unsqueeze(0)
        masks = []
        for b in range(image_embeddings.shape[0]):  # SAM's decoder repeats ONE image embedding per prompt
            low_res, _ = self.mask_decoder(image_embeddings=image_embeddings[b:b + 1], image_pe=position,
                                           sparse_prompt_embeddings=sparse[b], dense_prompt_embeddings=dense[b],
                                           multimask_output=False)
            masks.append(low_res[:, 0])
        masks = self.postprocess(torch.stack(masks), tuple(int(s) for s in output_size))
        background = torch.zeros_like(masks[:, :1])
        return torch.cat([background, masks], dim=1)

    def postprocess(self, masks: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """SAM's ``postprocess_masks``: low-res -> ``img_size``, crop the unpadded frame, -> patch size."""
        size = self.spec.image_size
        frame = sam_frame(*output_size, size)
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        masks = masks[..., :frame[0], :frame[1]]
        if frame != output_size:
            masks = F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)
        return masks

    def forward(self, x: torch.Tensor | None = None, image_embeddings: torch.Tensor | None = None,
                output_size: Sequence[int] | None = None, return_embeddings: bool = False):
        """``forward(x)`` -> logits. ``image_embeddings`` (e.g. cached) replace the encoder; then
        ``output_size`` is the patch size they came from. ``return_embeddings=True`` -> ``(logits,
        image_embeddings, prototypes)`` for the contrastive loss, returned from ``forward`` so DDP
        sees the prototypes used."""
        if image_embeddings is None:
            if x is None:
                raise ValueError("ClassSAM.forward needs x or image_embeddings")
            image_embeddings, output_size = self.encode(x), x.shape[-2:]
        elif output_size is None:
            raise ValueError("ClassSAM.forward(image_embeddings=...) needs the output_size of the patch")
        logits = self.decode(image_embeddings, output_size)
        return (logits, image_embeddings, self.prototypes) if return_embeddings else logits

    # --- official weights (module docstring) -------------------------------------------------------
    def _official_names(self) -> OfficialNames:
        """SurgicalSAM's ``model_ckp.pth`` names (each state dict's key as prefix) and the SAM checkpoint's."""
        names, prompts = OfficialNames(), self.prompt_encoder
        names.tree(self.image_encoder, "image_encoder")
        names.add(self.pe_layer, "prompt_encoder.pe_layer")
        names.add(prompts.prototypes, "prototypes_state_dict.class_embeddings")
        encoder = "prototype_prompt_encoder_state_dict"
        for module, official in ((prompts.dense[0], "dense_fc_1"), (prompts.dense[2], "dense_fc_2"),
                                 (prompts.sparse[0], "sparse_fc_1"), (prompts.sparse[2], "sparse_fc_2"),
                                 (prompts.negative, "pn_cls_embeddings.0"), (prompts.positive, "pn_cls_embeddings.1")):
            names.add(module, f"{encoder}.{official}")
        names.tree(self.mask_decoder, "sam_decoder_state_dict")
        return names

    # --- bookkeeping ------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}


def paper_class_sam(conventions: str = "default") -> ClassSAM:
    """SurgicalSAM's configuration: vit_h image encoder, 7 instrument classes (+ background), 2 tokens
    (EndoVis2018), RGB input. Random weights: no checkpoint is needed to build it."""
    return ClassSAM(input_channels=3, num_classes=8, sam_model_type="vit_h", num_tokens=2, conventions=conventions)


# --- SAM checkpoints --------------------------------------------------------------------------------

class SamCheckpointError(UserFacingError):
    """A SAM checkpoint is missing, unreadable or of another model type."""


def _unwrap_state_dict(state) -> dict | None:
    if isinstance(state, dict) and not any(k.startswith("image_encoder.") for k in state):
        for key in ("model", "state_dict"):  # fine-tuned SAM variants sometimes nest the weights
            if isinstance(state.get(key), dict):
                return state[key]
    return state if isinstance(state, dict) else None


def checkpoint_model_type(state_dict: dict) -> str:
    """Which SAM variant a state dict holds, from the encoder's width and depth (or a description)."""
    width = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, spec in SAM_SPECS.items():
        if (spec.encoder_embed_dim, spec.encoder_depth) == (width, depth):
            return name
    return f"an unknown SAM variant (encoder width {width}, {depth} blocks)"


def read_sam_checkpoint(path: str | os.PathLike) -> dict:
    """A SAM state dict from ``path`` (``torch.load(..., weights_only=True)``), or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {path} does not exist. Set {CHECKPOINT_VARIABLE} to the .pth file "
                                 f"of an official SAM checkpoint (e.g. sam_vit_h_4b8939.pth from "
                                 f"github.com/facebookresearch/segment-anything); nnunet-ext does not download it.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise SamCheckpointError(f"SAM checkpoint {path} could not be read ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}). The file is corrupt, "
                                 f"truncated (an interrupted download?) or not a PyTorch weights file: download "
                                 f"it again.") from error
    state = _unwrap_state_dict(state)
    if state is None or "image_encoder.patch_embed.proj.weight" not in state:
        raise SamCheckpointError(f"{path} is not a SAM checkpoint: it has no image_encoder.* weights (expected the "
                                 f"state dict of segment_anything's Sam, e.g. sam_vit_h_4b8939.pth).")
    return state


def _matching(module: nn.Module, state: dict, prefix: str) -> dict:
    own = module.state_dict()
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(part))
    wrong = sorted(k for k in own if k in part and tuple(part[k].shape) != tuple(own[k].shape))
    return {"weights": part, "missing": missing, "wrong_shape": wrong}


def load_sam_checkpoint(network: ClassSAM, path: str | os.PathLike) -> dict:
    """Load SAM's image encoder, mask decoder, positional encoding and point embeddings into ``network``.

    The class prompt encoder's MLPs and the prototypes keep their initialisation (official). The
    positive/negative class marks start from SAM's positive/negative point embeddings, repeated per
    token (official). Returns ``{"path", "model_type"}``.
    """
    state = read_sam_checkpoint(path)
    found = checkpoint_model_type(state)
    parts = {"image_encoder.": network.image_encoder, "mask_decoder.": network.mask_decoder}
    checks = {prefix: _matching(module, state, prefix) for prefix, module in parts.items()}
    if found != network.sam_model_type or any(c["missing"] or c["wrong_shape"] for c in checks.values()):
        details = "; ".join(f"{prefix}: {len(c['missing'])} missing, {len(c['wrong_shape'])} of another shape "
                            f"(e.g. {(c['missing'] + c['wrong_shape'])[:2]})" for prefix, c in checks.items()
                            if c["missing"] or c["wrong_shape"])
        hint = f" Set {MODEL_TYPE_VARIABLE}={found}, or use a {network.sam_model_type} checkpoint." \
            if found in SAM_SPECS else ""
        raise SamCheckpointError(f"SAM checkpoint {path} looks like {found}, but the network is "
                                 f"{network.sam_model_type}{': ' + details if details else ''}.{hint}")
    for prefix, module in parts.items():
        module.load_state_dict(checks[prefix]["weights"])
    with torch.no_grad():
        network.pe_layer.positional_encoding_gaussian_matrix.copy_(
            state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
        prompts, tokens = network.prompt_encoder, network.prompt_encoder.num_tokens
        prompts.negative.weight.copy_(state["prompt_encoder.point_embeddings.0.weight"].expand(tokens, -1))
        prompts.positive.weight.copy_(state["prompt_encoder.point_embeddings.1.weight"].expand(tokens, -1))
    return {"path": str(Path(path).resolve()), "model_type": found}
