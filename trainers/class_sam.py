"""ClassSAMTrainer: SAM with SurgicalSAM's class prompts (Yue et al., AAAI 2024) trained by nnU-Net v2.

Network: :class:`nnunet_ext.architectures.class_sam.ClassSAM` (frozen SAM image encoder, class
prompt encoder with one prototype per class, fine-tuned SAM mask decoder, nnU-Net-style logits).
nnU-Net's **2d** configuration only (SAM is a 2D model; nnU-Net's 2d predictor runs 3D volumes
slice by slice); other configurations are refused.

Settings (environment variables, so the stock commands need no extra options):

* ``NNUNET_EXT_SAM_CHECKPOINT`` - path of an official SAM checkpoint (``sam_vit_h_4b8939.pth``,
  ...), loaded with ``torch.load(..., weights_only=True)`` at the start of training. Never
  downloaded. Required to train; not needed for ``--c``, ``--val`` or prediction, whose weights come
  from nnU-Net's own checkpoint (which therefore holds the frozen encoder too: about 2.5 GB per
  checkpoint file at vit_h), nor with ``-pretrained_weights`` (e.g. SurgicalSAM's weights from
  ``nnunet-ext import-weights``), whose file holds every weight: it is then not read, so it cannot
  overwrite them. ``NNUNET_EXT_SAM_RANDOM_INIT=1`` trains from random SAM weights
  instead - an explicit opt-in for tests and benchmarks, never a fallback.
* ``NNUNET_EXT_SAM_MODEL_TYPE`` - ``vit_h`` (default, the paper's), ``vit_l``, ``vit_b``; ``tiny``
  is a small random SAM for tests only. Written with the other network arguments into the plans
  (``nnunet_ext_class_sam``), which nnU-Net copies into the model folder, so prediction builds
  the same network without the variable. A checkpoint of another type is refused, naming the type
  it looks like.
* ``NNUNET_EXT_SAM_CACHE`` - a folder: train on cached frozen-encoder embeddings
  (:mod:`nnunet_ext.embedding_cache`, under ``<folder>/<dataset>/<data_identifier>``) instead of
  encoding every augmented patch. Much faster, but training then sees fixed, un-augmented tiles of
  every slice (optionally mirrored copies, ``NNUNET_EXT_SAM_CACHE_VERSIONS`` = 1, 2 or 4;
  inference mirroring follows what training saw), as SurgicalSAM trains on precomputed
  embeddings. ``NNUNET_EXT_SAM_CACHE_MAX_GB`` (default 20) caps the folder's size, checked before
  anything is computed; a stale cache (data preprocessed again, other checkpoint/model
  type/transform) is refused unless ``NNUNET_EXT_SAM_CACHE_REBUILD=1``. Validation always runs the
  live network on nnU-Net's validation patches. The cache settings are method state: ``--c``
  keeps them unless the variable is set again (``NNUNET_EXT_SAM_CACHE=off`` switches it off).
  A damaged cache file (truncated array, corrupt json, damaged ``encoder.json``) is refused naming
  the file (``NNUNET_EXT_SAM_CACHE_REBUILD=1`` computes it again); so are preprocessed cases that
  cannot be read or whose shapes do not fit, and plans settings ClassSAM cannot take: one line
  under ``nnUNetv2_train``, no traceback.

Conventions: ``"conventions": "official"`` in the plans' ``nnunet_ext_class_sam`` builds ClassSAM with
SurgicalSAM's own preprocessing (needed for its released weights, ``nnunet-ext import-weights
ClassSAM``). It reads the uint8 RGB frame back from nnU-Net's ``rgb_to_0_1`` normalisation, so plans
that normalise the channels SAM sees in another way are refused (:func:`official_input_problem`),
when training starts and when a network is built from a model folder's plans; the embedding cache
records the conventions, so embeddings of one are never reused under the other.

Loss (:class:`nnunet_ext.losses.class_prompt.ClassSAMLoss`): SurgicalSAM's sigmoid Dice on the
present classes + its contrastive prototype loss (NT-Xent, temperature 0.07, class embeddings from
the frozen image embedding) + BCE on every class channel (the predictor prompts every class; the
official protocol never has to output an empty mask). No deep supervision (one output).

Optimiser (official ``train.py``): Adam, lr 1e-3 (EndoVis2018; 1e-4 for EndoVis2017), weight decay
1e-4, constant learning rate, no gradient clipping, over the trainable parameters only
(prototypes, class prompt encoder, mask decoder without its unused IoU head); the image encoder
has ``requires_grad=False`` and is not in the optimiser. 500 epochs (the official EndoVis2018
number; nnU-Net's epochs are 250 iterations of nnU-Net's 2d batch). ``torch.compile`` is off
(untested with SAM's decoder loop).

``segment-anything`` is the optional ``sam`` extra (``pip install "nnunet-ext[sam]"``), imported when
the trainer is created or its network built; without it the trainer stops with that one line.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from nnunet_ext import compat
from nnunet_ext.architectures.class_sam import (CHECKPOINT_VARIABLE, MODEL_TYPE_VARIABLE, ClassSAM,
                                                SamCheckpointError, default_channel_indices, load_sam_checkpoint,
                                                sam_spec, segment_anything_modeling)
from nnunet_ext.embedding_cache import CachedBatches, EmbeddingCache, build, module_digest
from nnunet_ext.errors import UserFacingError
from nnunet_ext.losses.class_prompt import ClassSAMLoss
from nnunet_ext.pretrained import LOADED_FROM
from nnunet_ext.trainers.base import METHOD_STATE_KEY, nnUNetExtTrainer

CLASS_SAM_PLANS_KEY = "nnunet_ext_class_sam"
RANDOM_INIT_VARIABLE = "NNUNET_EXT_SAM_RANDOM_INIT"
CACHE_VARIABLE = "NNUNET_EXT_SAM_CACHE"
CACHE_MAX_GB_VARIABLE = "NNUNET_EXT_SAM_CACHE_MAX_GB"
CACHE_VERSIONS_VARIABLE = "NNUNET_EXT_SAM_CACHE_VERSIONS"
CACHE_REBUILD_VARIABLE = "NNUNET_EXT_SAM_CACHE_REBUILD"
DEFAULT_MODEL_TYPE = "vit_h"
#: nnU-Net's normalisation scheme of ``rgb_to_0_1`` channels (x / 255), as the plans name it
RGB_NORMALIZATION = "RGBTo01Normalization"
_OFF = {"0", "off", "none", "false", "no"}
_MIRROR_AXES = {1: None, 2: (1,), 4: (0, 1)}  # nnU-Net's 2d axes (y, x) of the cached versions


class ClassSAMError(UserFacingError):
    """ClassSAMTrainer cannot run with this configuration or these settings."""


def default_network_settings(environ=os.environ) -> dict:
    """ClassSAM's keyword arguments for a new training (model type from the environment)."""
    model_type = environ.get(MODEL_TYPE_VARIABLE, "").strip() or DEFAULT_MODEL_TYPE
    sam_spec(model_type)  # unknown types are refused now, with the list
    return {"sam_model_type": model_type, "num_tokens": 2, "hidden_dim_dense": 128, "hidden_dim_sparse": 128,
            "channel_indices": None, "intensity_range": 3.0}


def _number(environ, variable: str, default, kind=float):
    text = environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise ClassSAMError(f"{variable}={text!r} must be a positive number (or unset for {default}).")
    return value


def build_class_sam(settings: dict, input_channels: int, num_classes: int) -> ClassSAM:
    """ClassSAM from the plans' ``nnunet_ext_class_sam`` settings; bad settings are a one-line error."""
    if not isinstance(settings, dict):
        raise ClassSAMError(f"The plans' {CLASS_SAM_PLANS_KEY!r} must be a JSON object of ClassSAM settings, not "
                            f"{settings!r}. Remove it from the plans to use the defaults.")
    try:
        return ClassSAM(input_channels=input_channels, num_classes=num_classes, **settings)
    except TypeError as error:
        known = sorted([*default_network_settings({}), "conventions"])
        raise ClassSAMError(f"The plans' {CLASS_SAM_PLANS_KEY!r} settings {settings} do not fit ClassSAM ({error}). "
                            f"Use only the keys {', '.join(known)}, or remove the entry to use the defaults.") from None


def official_input_problem(settings: dict, normalization_schemes: Sequence[str],
                           configuration: str | None = None) -> str | None:
    """Why a configuration cannot feed ClassSAM's official preprocessing, or None.

    ``conventions="official"`` turns each channel SAM sees back into the uint8 frame as ``round(255 x)``
    (``ClassSAM.official_sam_input``): right only for nnU-Net's ``rgb_to_0_1`` normalisation (``x / 255``).
    Any other scheme (z-score, CT, rescale per image, none) would show SAM another image; channels
    SAM does not see may be normalised in any way."""
    if not isinstance(settings, dict) or settings.get("conventions", "default") != "official":
        return None
    schemes = list(normalization_schemes)
    indices = settings.get("channel_indices")
    seen = sorted(set(indices if indices is not None else default_channel_indices(len(schemes))))
    wrong = [f"channel {c}: {schemes[c]}" for c in seen if isinstance(c, int) and 0 <= c < len(schemes)
             and schemes[c] != RGB_NORMALIZATION]
    if not wrong:
        return None
    where = f"configuration {configuration!r}" if configuration else "the configuration"
    return (f"ClassSAM's official conventions (SurgicalSAM's preprocessing) recover the uint8 RGB frame from nnU-Net's "
            f"rgb_to_0_1 normalisation (x / 255), but {where} normalises the channels SAM sees "
            f"otherwise ({', '.join(wrong)}), so SAM would see another image. Name those channels 'rgb_to_0_1' in "
            f"dataset.json's channel_names and plan and preprocess again, or remove \"conventions\": \"official\" "
            f"from the plans' {CLASS_SAM_PLANS_KEY!r}")


def case_shape_problem(data, seg, channels: int | None) -> str | None:
    """What is wrong with the shapes of a preprocessed 2d case (image ``(C, Z, Y, X)``, segmentation
    ``(1, Z, Y, X)``) for ClassSAM, or None."""
    if data.ndim != 4:
        return f"the image array has shape {tuple(data.shape)}, not (channels, slices, y, x)"
    if channels is not None and data.shape[0] != channels:
        return f"the image has {data.shape[0]} channel(s), but dataset.json lists {channels}"
    if tuple(seg.shape) != (1, *data.shape[1:]):
        return f"the segmentation has shape {tuple(seg.shape)}, the image {tuple(data.shape)}"
    if min(data.shape[1:]) < 1:
        return f"the image array has shape {tuple(data.shape)} (an empty axis)"
    return None


def load_checked_case(dataset, identifier: str, channels: int | None):
    """``(data, seg)`` of a preprocessed case for the embedding cache; an unreadable case or one whose shapes
    do not fit is a one-line :class:`ClassSAMError` naming it and the fix."""
    folder = getattr(dataset, "source_folder", "the preprocessed folder")
    fix = ("Preprocess the dataset again (nnUNetv2_preprocess -d DATASET -c 2d with the same plans), then train "
           "again; delete the embedding cache's folder if it was built from the old files.")
    try:
        data, seg = compat.load_preprocessed_case(dataset, identifier)
    except Exception as error:  # noqa: BLE001 - blosc2/numpy/pickle readers raise many types
        first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        raise ClassSAMError(f"The preprocessed case {identifier!r} in {folder} cannot be read "
                            f"({type(error).__name__}: {first}). {fix}") from None
    problem = case_shape_problem(data, seg, channels)
    if problem:
        raise ClassSAMError(f"The preprocessed case {identifier!r} in {folder} does not fit ClassSAM: {problem}. "
                            f"{fix}")
    return data, seg


def embedding_identity(network: ClassSAM) -> dict:
    """What a cached image embedding of ``network`` depends on (the cache's ``encoder.json``): the encoder
    and its weights, and the input transform - conventions (official and default preprocessing give other
    embeddings of the same patch), channels and intensity range."""
    return {"sam_model_type": network.sam_model_type, "image_size": network.spec.image_size,
            "encoder_weights_sha256": module_digest(network.image_encoder), "conventions": network.conventions,
            "channel_indices": list(network.channel_indices), "intensity_range": network.intensity_range}


@dataclass(frozen=True)
class CacheSettings:
    folder: str | None = None
    max_gb: float = 20.0
    versions: int = 1
    rebuild: bool = False

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    @classmethod
    def from_environment(cls, environ=os.environ, restored: dict | None = None) -> "CacheSettings":
        """The variables; where ``NNUNET_EXT_SAM_CACHE`` is unset, the settings a resumed run had."""
        text = environ.get(CACHE_VARIABLE, "").strip()
        if not text and restored:
            return cls(**restored)
        versions = _number(environ, CACHE_VERSIONS_VARIABLE, 1, int)
        if versions not in (1, 2, 4):
            raise ClassSAMError(f"{CACHE_VERSIONS_VARIABLE}={versions} must be 1 (no mirroring), 2 (+ left-right) "
                                f"or 4 (+ up-down and both).")
        folder = None if not text or text.lower() in _OFF else str(Path(text).expanduser().resolve())
        return cls(folder, _number(environ, CACHE_MAX_GB_VARIABLE, 20.0), versions,
                   environ.get(CACHE_REBUILD_VARIABLE, "").strip() == "1")


class ClassSAMTrainer(nnUNetExtTrainer):
    """ClassSAM on nnU-Net's 2d configuration: official Adam schedule, Dice + contrastive loss,
    optional embedding cache."""

    grad_clip = None  # official: no gradient clipping

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        segment_anything_modeling()  # the `sam` extra: without it, one line now, before nnU-Net sets anything up
        super().__init__(plans, configuration, fold, dataset_json, device)
        patch_size = self.configuration_manager.patch_size
        if len(patch_size) != 2:
            raise ClassSAMError(f"ClassSAMTrainer trains SAM, a 2D model, on nnU-Net's 2d configuration; "
                                f"{configuration!r} has a {len(patch_size)}D patch {list(patch_size)}. Run "
                                f"nnUNetv2_train DATASET 2d FOLD -tr ClassSAMTrainer (3D volumes are predicted "
                                f"slice by slice).")
        self.refuse_regions("it predicts one class per pixel (softmax over class logits)")
        self.enable_deep_supervision = False
        self.initial_lr, self.weight_decay, self.num_epochs = 1e-3, 1e-4, 500
        if CLASS_SAM_PLANS_KEY not in self.plans_manager.plans:  # plans that name it (a model folder's) win
            self.plans_manager.plans[CLASS_SAM_PLANS_KEY] = default_network_settings()
        problem = official_input_problem(self.network_settings, self.configuration_manager.normalization_schemes,
                                         configuration)
        if problem:
            plans_file = (Path(self.preprocessed_dataset_folder_base) / f"{self.plans_manager.plans_name}.json"
                          if self.preprocessed_dataset_folder_base else f"plans {self.plans_manager.plans_name!r}")
            raise ClassSAMError(f"{plans_file}: {problem}.")
        self.cache_settings = CacheSettings.from_environment()
        self.sam_checkpoint: dict | None = None
        self._weights_restored = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        settings = plans_manager.plans.get(CLASS_SAM_PLANS_KEY) or default_network_settings()
        problem = official_input_problem(settings, configuration_manager.normalization_schemes)
        if problem:  # a model folder's plans (prediction, import-weights --model-folder)
            raise ClassSAMError(f"plans {plans_manager.plans_name!r} of {plans_manager.dataset_name}: {problem}.")
        return build_class_sam(settings, num_input_channels, num_output_channels)

    @property
    def network_settings(self) -> dict:
        return self.plans_manager.plans[CLASS_SAM_PLANS_KEY]

    def class_sam(self) -> ClassSAM:
        """The ClassSAM module itself (inside DDP or torch.compile wrappers)."""
        module = self.network.module if self.is_ddp else self.network
        return getattr(module, "_orig_mod", module)

    def _do_i_compile(self):
        return False

    def initialize(self):
        super().initialize()
        counts = self.class_sam().parameter_counts()
        self.print_to_log_file(
            f"ClassSAM ({self.network_settings['sam_model_type']}): {counts['trainable']:,} trainable of "
            f"{counts['total']:,} parameters ({counts['frozen']:,} frozen: SAM image encoder, IoU head, class marks)")

    def configure_optimizers(self):
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, compat.constant_lr_scheduler(optimizer, self.initial_lr, self.num_epochs)

    def _build_loss(self):
        image_size = sam_spec(self.network_settings["sam_model_type"]).image_size
        return ClassSAMLoss(image_size, ignore_label=self.label_manager.ignore_label)

    # --- SAM weights ------------------------------------------------------------------------------
    def load_sam_weights(self) -> None:
        """SAM's pretrained weights from ``NNUNET_EXT_SAM_CHECKPOINT`` (or the explicit random opt-in)."""
        path = os.environ.get(CHECKPOINT_VARIABLE, "").strip()
        model_type = self.network_settings["sam_model_type"]
        if not path:
            if os.environ.get(RANDOM_INIT_VARIABLE, "").strip() == "1":
                self.print_to_log_file(f"nnunet-ext: WARNING: {RANDOM_INIT_VARIABLE}=1: ClassSAM trains from RANDOM "
                                       f"SAM weights (tests and benchmarks only)")
                self.sam_checkpoint = {"path": None, "model_type": model_type}
                return
            raise SamCheckpointError(
                f"ClassSAMTrainer needs SAM's pretrained weights: set {CHECKPOINT_VARIABLE} to an official SAM "
                f"{model_type} checkpoint, e.g. export {CHECKPOINT_VARIABLE}=/path/to/sam_vit_h_4b8939.pth (model "
                f"type from {MODEL_TYPE_VARIABLE}, default {DEFAULT_MODEL_TYPE}; checkpoints are at "
                f"github.com/facebookresearch/segment-anything; nnunet-ext does not download them).")
        self.sam_checkpoint = load_sam_checkpoint(self.class_sam(), path)
        self.print_to_log_file(f"nnunet-ext: SAM {model_type} weights from {self.sam_checkpoint['path']}")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        pretrained = getattr(self.class_sam(), LOADED_FROM, None)
        if pretrained is not None:  # -pretrained_weights: the file held every weight, the SAM encoder included
            model_type = self.network_settings["sam_model_type"]
            self.sam_checkpoint = {"path": None, "model_type": model_type, "pretrained_weights": pretrained}
            self.print_to_log_file(f"nnunet-ext: ClassSAM starts from the pretrained weights {pretrained}; "
                                   f"{CHECKPOINT_VARIABLE} is not read")
        elif not self._weights_restored:  # --c: nnU-Net's checkpoint already holds every weight
            self.load_sam_weights()
        super().on_train_start()

    # --- data -----------------------------------------------------------------------------------
    def training_batches(self, dataset, transforms, initial_patch_size, num_processes: int):
        """nnU-Net's augmented patches, or with the embedding cache, batches of cached embeddings (the
        inference mirroring then follows the versions the cache holds)."""
        if not self.cache_settings.enabled:
            return super().training_batches(dataset, transforms, initial_patch_size, num_processes)
        train = self.cached_batches(dataset)
        self.inference_allowed_mirroring_axes = _MIRROR_AXES[self.cache_settings.versions]
        return train

    def start_streams(self, train, validation) -> None:
        if isinstance(train, CachedBatches):  # no workers to start: only the validation stream has them
            next(validation)
        else:
            super().start_streams(train, validation)

    def embedding_cache(self) -> EmbeddingCache:
        network, settings = self.class_sam(), self.cache_settings
        identity = embedding_identity(network)
        spec = network.spec
        folder = Path(settings.folder) / self.plans_manager.dataset_name / self.configuration_manager.data_identifier
        return EmbeddingCache(
            folder, identity, self.configuration_manager.patch_size,
            (spec.prompt_embed_dim, spec.embedding_size, spec.embedding_size), settings.versions,
            settings.max_gb * 1024 ** 3, settings.rebuild,
            stale_advice=f"point {CACHE_VARIABLE} at another folder, or set {CACHE_REBUILD_VARIABLE}=1 to rebuild it "
                         f"in place (only the cache's own files there are replaced)",
            size_advice=f"Raise {CACHE_MAX_GB_VARIABLE}, use fewer versions ({CACHE_VERSIONS_VARIABLE}), or train "
                        f"without the cache (unset {CACHE_VARIABLE}).")

    def cached_batches(self, dataset_tr) -> CachedBatches:
        """Bring the embedding cache up to date for the training cases; batches drawn from it."""
        cache, network = self.embedding_cache(), self.class_sam()
        identifiers = list(dataset_tr.identifiers)
        world_size, _ = compat.distributed_world()

        def encode(tiles):
            if world_size > 1:
                raise ClassSAMError(f"The embedding cache at {cache.folder} is incomplete; it is not built under DDP. "
                                    f"Build it with a single-GPU run of the same command first (one epoch is "
                                    f"enough, e.g. NNUNET_EXT_NUM_EPOCHS=1), then train with DDP.")
            with torch.no_grad(), compat.training_autocast(self.device):
                return network.encode(torch.from_numpy(tiles).to(self.device)).float().cpu().numpy()

        channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))) or None
        build(cache, lambda i: load_checked_case(dataset_tr, i, channels), identifiers, encode, self.batch_size,
              log=self.print_to_log_file)
        return CachedBatches(cache, identifiers, self.batch_size, self.oversample_foreground_percent)

    # --- the step -------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step structure; the network also returns what the contrastive loss needs."""
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with compat.training_autocast(self.device):
            if "embeddings" in batch:  # from the cache
                logits, embeddings, prototypes = self.network(
                    image_embeddings=batch["embeddings"].to(self.device, non_blocking=True),
                    output_size=tuple(target.shape[-2:]), return_embeddings=True)
            else:
                logits, embeddings, prototypes = self.network(batch["data"].to(self.device, non_blocking=True),
                                                              return_embeddings=True)
            loss = self.loss(logits, target, embeddings, prototypes)
        self.optimizer_step(loss)  # the base's backward/AMP/step, without clipping (grad_clip None)
        return {"loss": loss.detach().cpu().numpy()}

    # --- state across --c -------------------------------------------------------------------------
    def method_state(self) -> dict:
        return {**super().method_state(),
                "class_sam": {"network": dict(self.network_settings), "sam_checkpoint": self.sam_checkpoint,
                              "cache": asdict(self.cache_settings)}}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        saved = state.get("class_sam", {})
        self.sam_checkpoint = saved.get("sam_checkpoint")
        self.cache_settings = CacheSettings.from_environment(restored=saved.get("cache"))
        if self.cache_settings.enabled:
            self.print_to_log_file(f"nnunet-ext: embedding cache {self.cache_settings.folder}")

    def intact_checkpoint(self, filename: str) -> tuple[str, dict]:
        """The base's choice of an intact checkpoint (fallback included), checked against this run's settings."""
        path, checkpoint = super().intact_checkpoint(filename)
        self._refuse_other_settings(checkpoint)
        return path, checkpoint

    def _refuse_other_settings(self, checkpoint: dict) -> None:
        saved = checkpoint.get(METHOD_STATE_KEY, {}).get("class_sam", {}).get("network")
        if saved is not None and saved != self.network_settings:
            raise ClassSAMError(f"The checkpoint was trained with ClassSAM {saved}; this run builds "
                                f"{self.network_settings} (is {MODEL_TYPE_VARIABLE} set as for that training?).")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, dict):
            self._refuse_other_settings(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)  # a path is checked in intact_checkpoint
        self._weights_restored = True
