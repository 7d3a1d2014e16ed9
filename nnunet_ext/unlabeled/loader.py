"""The two-stream training batch: B_l labelled + B_u unlabelled patches, nnU-Net's loader and augmentation.

Semi-supervised methods (MC-Net+, LeFeD, mean teacher, ...) train on batches that mix labelled and
unlabelled patches, 2 + 2 in the papers. This is composed from nnU-Net's own parts, nothing copied:

* labelled stream: nnU-Net's ``nnUNetDataLoader`` on the fold's (budgeted) training cases, with its
  foreground oversampling, wrapped in the augmenter nnU-Net uses;
* unlabelled stream: ``UnlabeledDataLoader``, the same loader with random crops only (there is no
  label to oversample; for budget cases the label exists but must not steer sampling) and no target,
  on a ``UnionDataset`` of the budget's unlabelled cases and the preprocessed ``imagesUnlabeled``;
* both get the trainer's own training transforms (``get_training_transforms``), so both are augmented
  exactly as nnU-Net augments; the unlabelled stream carries the nonzero mask as its segmentation
  through the transforms (masked normalisation needs it) and then drops it;
* ``TwoStreamBatches`` draws one batch from each and returns ``data`` (labelled first, then
  unlabelled, concatenated), ``target`` (labelled part only; nnU-Net's deep-supervision list),
  ``labeled_count`` (= B_l) and the case keys of both parts.

Under DDP each process draws its own share (``per_process_batch_size``), as nnU-Net splits its batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from nnunet_ext import compat

# nnU-Net's classes, through compat; annotated so that mypy (which does not read nnU-Net) accepts them as bases
nnUNetBaseDataset: type[Any] = compat.nnunet_base_dataset_class()
nnUNetDataLoader: type[Any] = compat.nnunet_data_loader_class()


def per_process_batch_size(global_batch_size: int, world_size: int, rank: int) -> int:
    """This process's share of a global batch: an even split, the remainder to the lowest ranks (as nnU-Net).

    Raises when a stream with a positive batch would get no sample on some process.
    """
    if global_batch_size < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch split: batch {global_batch_size}, world size {world_size}, rank {rank}")
    if 0 < global_batch_size < world_size:
        raise ValueError(f"a global batch of {global_batch_size} cannot be split over {world_size} processes; "
                         f"use at least {world_size} (one per GPU)")
    return global_batch_size // world_size + (1 if rank < global_batch_size % world_size else 0)


class UnionDataset(nnUNetBaseDataset):
    """Several nnU-Net datasets (possibly different folders and storage formats) as one.

    Used for the unlabelled pool: budget cases from the labelled folder plus the preprocessed
    ``imagesUnlabeled`` folder. Identifiers must be unique across the parts (the convention checks it).
    """

    def __init__(self, parts: Sequence[Any]):
        owner: dict[str, Any] = {}
        for part in parts:
            for identifier in part.identifiers:
                if identifier in owner:
                    raise ValueError(f"case {identifier!r} is in two unlabelled sources "
                                     f"({owner[identifier].source_folder}"
                                     f" and {part.source_folder}); case names must be unique")
                owner[identifier] = part
        self._owner = owner
        self.parts = list(parts)
        super().__init__(folder=",".join(str(p.source_folder) for p in parts), identifiers=list(owner))

    def load_case(self, identifier):
        return self._owner[identifier].load_case(identifier)

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("UnionDataset is read-only")

    @staticmethod
    def get_identifiers(folder: str) -> list[str]:
        raise NotImplementedError("UnionDataset has no folder of its own")


class UnlabeledDataLoader(nnUNetDataLoader):
    """nnU-Net's loader for unlabelled patches: random crops only, and no ``target`` in the batch."""

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager, transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=transforms)
        # with an ignore label nnU-Net samples "annotated" voxels; unlabelled cases have none
        self.has_ignore = False

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        batch.pop("target", None)
        return batch


class TwoStreamBatches:
    """Iterator over mixed batches from a labelled and an unlabelled augmenter (see module docstring).

    ``unlabeled`` may be ``None`` (B_u = 0, e.g. a supervised baseline under a label budget).
    """

    def __init__(self, labeled, unlabeled, labeled_batch_size: int, unlabeled_batch_size: int):
        self.labeled, self.unlabeled = labeled, unlabeled
        self.labeled_batch_size, self.unlabeled_batch_size = labeled_batch_size, unlabeled_batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        labeled = next(self.labeled)
        batch = {"target": labeled["target"], "labeled_count": int(labeled["data"].shape[0]),
                 "keys": [str(k) for k in labeled["keys"]], "unlabeled_keys": []}
        if self.unlabeled is None:
            batch["data"] = labeled["data"]
            return batch
        unlabeled = next(self.unlabeled)
        batch["data"] = torch.cat([labeled["data"], unlabeled["data"]], dim=0)
        batch["unlabeled_keys"] = [str(k) for k in unlabeled["keys"]]
        return batch

    next = __next__

    def _finish(self) -> None:
        for augmenter in (self.labeled, self.unlabeled):
            if augmenter is not None:
                compat.finish_augmenter(augmenter)


def labeled_part(outputs, labeled_count: int):
    """The first ``labeled_count`` samples of a network output (a tensor, or a list/tuple of them for deep
    supervision or several decoders, nested as deep as needed)."""
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(labeled_part(o, labeled_count) for o in outputs)
    return outputs[:labeled_count]


def unlabeled_part(outputs, labeled_count: int):
    """The samples after the first ``labeled_count`` (the unlabelled part), same nesting as the input."""
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(unlabeled_part(o, labeled_count) for o in outputs)
    return outputs[labeled_count:]


def split_processes(num_processes: int, labeled_batch_size: int, unlabeled_batch_size: int) -> tuple[int, int]:
    """Share nnU-Net's augmentation workers (``nnUNet_n_proc_DA``) between the streams by batch size;
    0 stays 0 (single-threaded, in the training process), otherwise each stream gets at least one."""
    if num_processes == 0:
        return 0, 0
    if unlabeled_batch_size == 0:
        return num_processes, 0
    share = labeled_batch_size / (labeled_batch_size + unlabeled_batch_size)
    labeled = max(1, int(np.floor(num_processes * share + 0.5)))
    return labeled, max(1, num_processes - labeled)
