"""Tiny synthetic replicas of the KiTS21, AMOS22 and SegRap2023 release layouts.

Why: the converters must be tested (and benchmarked) on the exact folder and file names of each
release without downloading gigabytes under licence. The voxels are noise and boxes; only the
layout, the file names, the geometry and the label values are faithful. Deterministic per seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext import atomic_io
from nnunet_ext.challenges.amos22 import RELEASE_LABELS

SHAPE = (8, 16, 16)  # (z, y, x)
SPACING = (0.8, 0.8, 2.5)  # (x, y, z) mm as SimpleITK orders it
AMOS_LABELS = RELEASE_LABELS


def write_volume(array: np.ndarray, path: str | Path, spacing: Sequence[float] = SPACING,
                 origin: Sequence[float] = (-10.0, -20.0, 5.0)) -> Path:
    """Write a (z, y, x) array as a compressed NIfTI with the given (x, y, z) spacing and origin."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    with atomic_io.atomic_path(path, durable=False) as temporary:  # synthetic scratch data: no fsync
        sitk.WriteImage(image, str(temporary), True)
    return path


def ct_volume(rng: np.random.Generator, shape: Sequence[int] = SHAPE) -> np.ndarray:
    return rng.normal(40.0, 200.0, tuple(shape)).clip(-1024, 3071).astype(np.int16)


def box_labels(rng: np.random.Generator, values: Sequence[int], shape: Sequence[int] = SHAPE) -> np.ndarray:
    """A label map with one small box per value (later boxes may cover earlier ones, as nested anatomy does)."""
    labels: np.ndarray = np.zeros(tuple(shape), dtype=np.uint8)
    for value in values:
        size = [max(1, s // 4) for s in shape]
        start = [int(rng.integers(0, s - w + 1)) for s, w in zip(shape, size)]
        labels[tuple(slice(a, a + w) for a, w in zip(start, size))] = value
    return labels


def kits_labels(rng: np.random.Generator, shape: Sequence[int] = SHAPE) -> np.ndarray:
    """Kidney (1) with a tumour (2) and a cyst (3) inside, as the KiTS21 hierarchy has it."""
    labels: np.ndarray = np.zeros(tuple(shape), dtype=np.uint8)
    z, y, x = shape
    labels[1:z - 1, 2:y - 2, 2:x // 2] = 1
    labels[z // 2 - 1:z // 2 + 1, 4:7, 3:5] = 2
    labels[z // 2 - 1:z // 2 + 1, y - 7:y - 4, 3:5] = 3
    return np.roll(labels, int(rng.integers(0, 3)), axis=2)


def write_kits21_replica(root: str | Path, num_labelled: int = 3, num_test: int = 1,
                         shape: Sequence[int] = SHAPE, seed: int = 0) -> Path:
    """``root/kits21/data/case_XXXXX/{imaging,aggregated_MAJ_seg}.nii.gz``; returns the data folder."""
    rng = np.random.default_rng(seed)
    data = Path(root) / "kits21" / "data"
    for index in range(num_labelled + num_test):
        case = data / f"case_{index:05d}"
        write_volume(ct_volume(rng, shape), case / "imaging.nii.gz")
        if index < num_labelled:
            write_volume(kits_labels(rng, shape), case / "aggregated_MAJ_seg.nii.gz")
    return data


def write_amos22_replica(root: str | Path, ct: int = 2, mri: int = 1, validation: int = 1, test: int = 1,
                         validation_labels: bool = True, shape: Sequence[int] = SHAPE, seed: int = 0,
                         validation_mri: int = 0, first_stage: bool = False) -> Path:
    """``root/amos22`` as released; returns it.

    Zenodo release (default): dataset.json with "training", "validation", "test" and "labels";
    imagesTr/labelsTr, imagesVa (labelsVa with ``validation_labels``), imagesTs. ``first_stage``: the
    challenge's first release instead: task1_dataset.json (CT cases) and task2_dataset.json (all) with
    "training" and "test" (plain image paths, the validation-phase images in imagesTs), no imagesVa.
    Ids: training CT from amos_0001, MRI from amos_0501; validation CT from amos_0101, MRI from
    amos_0601; test from amos_0201.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "amos22"
    organs = list(range(1, len(AMOS_LABELS)))
    validation_ids = [*range(101, 101 + validation), *range(601, 601 + validation_mri)]
    if first_stage:
        splits = {"training": ([*range(1, ct + 1), *range(501, 501 + mri)], "Tr", "labelsTr"),
                  "test": (validation_ids, "Ts", None)}
    else:
        splits = {"training": ([*range(1, ct + 1), *range(501, 501 + mri)], "Tr", "labelsTr"),
                  "validation": (validation_ids, "Va", "labelsVa" if validation_labels else None),
                  "test": (list(range(201, 201 + test)), "Ts", None)}
    release: dict = {"name": "AMOS", "labels": {str(i): n for i, n in enumerate(AMOS_LABELS)}}
    for key, (numbers, suffix, label_folder) in splits.items():
        entries: list = []
        for number in numbers:
            case = f"amos_{number:04d}"
            entry = {"image": f"./images{suffix}/{case}.nii.gz"}
            write_volume(ct_volume(rng, shape), base / entry["image"])
            if label_folder:
                entry["label"] = f"./{label_folder}/{case}.nii.gz"
                write_volume(box_labels(rng, organs, shape), base / entry["label"])
            entries.append(entry if label_folder or not first_stage else entry["image"])
        release[key] = entries
    if not first_stage:
        atomic_io.write_json(base / "dataset.json", release)
        return base
    for task, keep in ((1, lambda entry: int(str(entry if isinstance(entry, str) else entry["image"])[-11:-7]) <= 500),
                       (2, lambda entry: True)):
        atomic_io.write_json(base / f"task{task}_dataset.json",
                             {**release, **{key: [e for e in release[key] if keep(e)] for key in splits}})
    return base


def write_segrap2023_replica(root: str | Path, num_labelled: int = 2, num_test: int = 0,
                             shape: Sequence[int] = SHAPE, seed: int = 0) -> Path:
    """``root/SegRap2023`` with the training image folder and its ``_OneHot_Labels`` sibling; returns it."""
    from nnunet_ext.challenges.segrap2023 import CHANNEL_FILES, IMAGE_FOLDER, LABELS_SUFFIX, NUM_OAR_CLASSES

    rng = np.random.default_rng(seed)
    base = Path(root) / "SegRap2023"
    labels = base / f"{IMAGE_FOLDER}{LABELS_SUFFIX}"
    for index in range(num_labelled + num_test):
        case = f"segrap_{index:04d}"
        for name in CHANNEL_FILES:
            write_volume(ct_volume(rng, shape), base / IMAGE_FOLDER / case / name)
        if index < num_labelled:
            write_volume(box_labels(rng, range(1, NUM_OAR_CLASSES + 1), shape), labels / "Task001" / f"{case}.nii.gz")
            write_volume(box_labels(rng, (1, 2), shape), labels / "Task002" / f"{case}.nii.gz")
    return base
