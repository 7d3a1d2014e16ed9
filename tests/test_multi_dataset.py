"""Multi-dataset mode of the synthetic generator (nnunet_ext.datasets.multi_dataset)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_ext.datasets.multi_dataset import (
    DEFAULT_SOURCES,
    PartialSource,
    write_multi_dataset,
    write_partially_labelled_dataset,
)
from nnunet_ext.datasets.synthetic import SyntheticSpec, _export_labels, _render_image, _synthesize_structures

SPEC = SyntheticSpec(num_training=2, num_test=1, shape=(16, 32, 32), spacing=(2.5, 1.0, 1.0))
IDS = (971, 972, 973)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_multi_dataset(tmp_path_factory.mktemp("raw"), IDS, SPEC)


def test_three_datasets_with_overlapping_labels_and_channel_counts(family: list[Path]) -> None:
    assert [f.name for f in family] == ["Dataset971_SynthLiverKidney", "Dataset972_SynthLiverSpleenLesion",
                                        "Dataset973_SynthKidneySpleen"]
    expected = [({"background": 0, "liver": 1, "kidney": 2}, 1),
                ({"background": 0, "liver": 1, "spleen": 2, "lesion": 3}, 2),
                ({"background": 0, "kidney": 1, "spleen": 2}, 4)]
    for folder, (labels, channels) in zip(family, expected):
        ds = json.loads((folder / "dataset.json").read_text())
        assert ds["labels"] == labels and ds["channel_names"] == {str(c): "CT" for c in range(channels)}
        assert ds["numTraining"] == 2
        names = sorted(p.name for p in (folder / "imagesTr").iterdir())
        assert names == sorted(f"synth_{i:03d}_{c:04d}.nii.gz" for i in range(2) for c in range(channels))
        assert [p.name for p in (folder / "labelsTs").iterdir()] == ["synth_002.nii.gz"]
        for path in sorted((folder / "labelsTr").iterdir()):
            assert set(np.unique(_array(path)).tolist()) == set(labels.values()), path


def test_unannotated_structures_are_in_the_image_but_background_in_the_labels(family: list[Path]) -> None:
    folder, source = family[0], DEFAULT_SOURCES[0]  # liver + kidney annotated; spleen and lesion not
    spec = dataclasses.replace(SPEC, num_channels=1, seed=SPEC.seed)
    structures = _synthesize_structures(spec, 1)
    label = _array(folder / "labelsTr" / "synth_001.nii.gz")
    np.testing.assert_array_equal(label, _export_labels(structures, source.labels))
    assert not label[structures["spleen"]].any() and not label[structures["lesion"]].any()
    image = _array(folder / "imagesTr" / "synth_001_0000.nii.gz")
    np.testing.assert_array_equal(image, _render_image(spec, 1, structures)[0])
    # the spleen is visible: its core differs from the surrounding soft tissue as in a labelled dataset
    core = ndimage.binary_erosion(structures["spleen"])
    soft = structures["body"] & ~ndimage.binary_dilation(
        structures["spleen"] | structures["liver"] | structures["kidney"] | structures["fat"] | structures["spine"]
        | structures["aorta"], iterations=2)
    assert core.sum() > 20 and float(np.median(image[core])) - float(np.median(image[soft])) > 50


def test_each_dataset_has_its_own_patients_and_the_same_anatomy_in_every_channel(family: list[Path]) -> None:
    first = _array(family[0] / "imagesTr" / "synth_000_0000.nii.gz")
    second = _array(family[1] / "imagesTr" / "synth_000_0000.nii.gz")
    assert not np.array_equal(first, second), "datasets must not share cases"
    spec = dataclasses.replace(SPEC, num_channels=4, seed=SPEC.seed + 2)
    structures = _synthesize_structures(spec, 0)
    label = _array(family[2] / "labelsTr" / "synth_000.nii.gz")
    np.testing.assert_array_equal(label, _export_labels(structures, ("kidney", "spleen")))
    channels = [_array(family[2] / "imagesTr" / f"synth_000_{c:04d}.nii.gz") for c in range(4)]
    assert all(not np.array_equal(channels[0], c) for c in channels[1:])


def test_rewrite_is_idempotent_and_other_labels_are_refused(tmp_path: Path) -> None:
    folders = write_multi_dataset(tmp_path, IDS, SPEC)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()}
    assert write_multi_dataset(tmp_path, IDS, SPEC) == folders
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="Dataset971_SynthLiverKidney"):
        write_partially_labelled_dataset(tmp_path, 971, "SynthLiverKidney", SPEC, ("liver",))
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dataset_ids": (1, 2)}, "one id per source"),
    ({"dataset_ids": (1, 1, 2)}, "repeats"),
    ({"sources": (PartialSource("X", ("pancreas",), 1),), "dataset_ids": (1,)}, "pancreas"),
    ({"sources": (PartialSource("X", (), 1),), "dataset_ids": (1,)}, "at least one"),
    ({"sources": (PartialSource("X", "liver", 1),), "dataset_ids": (1,)}, "sequence"),
    ({"sources": (PartialSource("X", ("liver",), 0),), "dataset_ids": (1,)}, "num_channels"),
])
def test_bad_arguments_raise_before_writing(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_multi_dataset(tmp_path, **{"spec": SPEC, **kwargs})
    assert list(tmp_path.iterdir()) == []
