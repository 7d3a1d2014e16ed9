"""Several partially labelled synthetic datasets, for multi-dataset methods (UniSeg, DoDNet).

Why: universal models learn from datasets that each annotate a different subset of the same
anatomy, with different numbers of channels. This writes such a family from the anatomy of
:mod:`nnunet_ext.datasets.synthetic`, for the demo and the tests of ``nnunet-ext merge``, the
task-aware sampler and the partial-label losses. The default family (:data:`DEFAULT_SOURCES`):

    ===  =========================  =======================  ========
    id   dataset                    labels (value order)     channels
    ===  =========================  =======================  ========
    971  SynthLiverKidney           liver, kidney            1
    972  SynthLiverSpleenLesion     liver, spleen, lesion    2
    973  SynthKidneySpleen          kidney, spleen           4
    ===  =========================  =======================  ========

Every image shows ALL structures of the spec (liver, kidney, spleen and the liver lesion), as
a real scan shows organs nobody annotated; only the listed ones are exported, the others are
background in that dataset's labels (the lesion too: in SynthLiverKidney the lesion's voxels
are 0, not liver, so no dataset contradicts another's annotation). Label values follow the
listed order, so the same organ has different values in different sources (kidney is 2 in
SynthLiverKidney and 1 in SynthKidneySpleen), as in real collections.

Each dataset uses its own seed (``spec.seed + its position``): different patients. The writer
reuses synthetic.py's case writer and its conventions (:mod:`nnunet_ext.raw_dataset`: staged, atomic
write; idempotent re-runs; the spec plus the exported labels stored in dataset.json).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Sequence

from nnunet_ext import raw_dataset
from nnunet_ext.datasets.synthetic import (
    METADATA_KEY,
    SUBFOLDERS,
    SyntheticSpec,
    _dataset_json,
    _expected_files,
    _metadata,
    _write_cases,
    dataset_folder_name,
)

__all__ = ["DEFAULT_DATASET_IDS", "DEFAULT_SOURCES", "MULTI_SPEC", "PartialSource", "write_multi_dataset",
           "write_partially_labelled_dataset"]


@dataclass(frozen=True)
class PartialSource:
    """One dataset of the family: its name, the structures it annotates (value order), its channels."""

    name: str
    labels: tuple[str, ...]
    num_channels: int


DEFAULT_SOURCES: tuple[PartialSource, ...] = (
    PartialSource("SynthLiverKidney", ("liver", "kidney"), 1),
    PartialSource("SynthLiverSpleenLesion", ("liver", "spleen", "lesion"), 2),
    PartialSource("SynthKidneySpleen", ("kidney", "spleen"), 4),
)
DEFAULT_DATASET_IDS: tuple[int, ...] = (971, 972, 973)
#: Small enough for CPU tests and the demo; nnU-Net still plans a 3-4 stage U-Net on it.
MULTI_SPEC = SyntheticSpec(num_training=4, num_test=1, shape=(16, 40, 40), spacing=(2.5, 1.0, 1.0))


def _partial_metadata(spec: SyntheticSpec, labels: Sequence[str]) -> dict[str, Any]:
    return {**_metadata(spec), "generator": "nnunet_ext.datasets.multi_dataset", "exported_labels": list(labels)}


def _check_labels(spec: SyntheticSpec, labels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labels, str):
        raise ValueError(f"labels={labels!r} must be a sequence of names, e.g. ({labels!r},).")
    labels = tuple(labels)
    if not labels:
        raise ValueError(f"labels={labels!r} must name at least one structure of {list(spec.label_names)}.")
    unknown = [n for n in labels if n not in spec.label_names]
    if unknown:
        raise ValueError(f"labels {unknown} are not drawn by the spec; choose from {list(spec.label_names)} "
                         f"(spec.organs and spec.with_lesion decide what is drawn).")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels={labels} lists a structure twice; list each once.")
    return labels


def write_partially_labelled_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str,
                                     spec: SyntheticSpec, labels: Sequence[str]) -> pathlib.Path:
    """A synthetic dataset drawing every structure of ``spec`` but annotating only ``labels``.

    Same guarantees as :func:`nnunet_ext.datasets.synthetic.write_synthetic_dataset`: an
    identical existing dataset is returned untouched, other existing content raises
    FileExistsError, and the folder appears atomically.
    """
    labels = _check_labels(spec, labels)
    raw_root = pathlib.Path(raw_root)
    folder = raw_root / dataset_folder_name(dataset_id, name)
    metadata = _partial_metadata(spec, labels)
    if folder.exists() or folder.is_symlink():
        try:
            stored = json.loads((folder / "dataset.json").read_text())
        except (OSError, ValueError):
            stored = None
        if isinstance(stored, dict) and stored.get(METADATA_KEY) == metadata and \
                all((folder / f).is_file() for f in _expected_files(spec)):
            return folder
        if not folder.is_dir() or any(folder.iterdir()):
            raise FileExistsError(f"{folder} already exists and was not written by this generator with the same "
                                  f"spec and labels; it was left untouched. Choose another dataset_id/name or "
                                  f"remove the folder yourself.")
    conflicts = raw_dataset.other_folders_with_id(raw_root, dataset_id, folder.name)
    if conflicts:
        raise FileExistsError(f"{raw_root} already holds {conflicts} with dataset id {dataset_id}; choose another "
                              f"dataset_id.")

    dataset_json = _dataset_json(spec, name)
    dataset_json["description"] = (f"Synthetic abdominal CT-like volumes (nnunet_ext, deterministic); all "
                                   f"structures drawn, only {list(labels)} annotated.")
    dataset_json["labels"] = {"background": 0, **{n: i for i, n in enumerate(labels, start=1)}}
    dataset_json[METADATA_KEY] = metadata
    with raw_dataset.new_dataset_folder(folder, SUBFOLDERS) as staging:
        _write_cases(staging, spec, labels)
        raw_dataset.write_dataset_json(staging, dataset_json)
    return folder


def write_multi_dataset(raw_root: str | os.PathLike, dataset_ids: Sequence[int] = DEFAULT_DATASET_IDS,
                        spec: SyntheticSpec = MULTI_SPEC,
                        sources: Sequence[PartialSource] = DEFAULT_SOURCES) -> list[pathlib.Path]:
    """Write one partially labelled dataset per entry of ``sources`` (ids ``dataset_ids``).

    ``spec`` gives shape, spacing, case counts and the drawn anatomy; each dataset overrides its
    channel count and uses seed ``spec.seed + position``. Returns the dataset folders.
    """
    if len(dataset_ids) != len(sources):
        raise ValueError(f"{len(dataset_ids)} dataset id(s) for {len(sources)} source(s); give one id per source.")
    if len(set(dataset_ids)) != len(dataset_ids):
        raise ValueError(f"dataset_ids={list(dataset_ids)} repeats an id; nnU-Net needs one folder per id.")
    for source in sources:  # check everything before writing anything
        _check_labels(spec, source.labels)
        dataclasses.replace(spec, num_channels=source.num_channels)
    return [write_partially_labelled_dataset(
        raw_root, dataset_id, source.name,
        dataclasses.replace(spec, num_channels=source.num_channels, seed=spec.seed + position), source.labels)
        for position, (dataset_id, source) in enumerate(zip(dataset_ids, sources))]
