"""Tests for nnunet_ext.datasets.synthetic (dataset generator) and figures (overlay PNG)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from nnunet_ext.datasets import (
    ORGANS,
    SyntheticSpec,
    dataset_folder_name,
    make_case,
    save_overlay_figure,
    write_synthetic_dataset,
)
from nnunet_ext.datasets.figures import select_slices
from nnunet_ext.datasets.synthetic import _export_labels, _synthesize_structures

SMALL = SyntheticSpec(num_training=3, num_test=1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _snapshot(folder: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, to prove a folder was not touched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- determinism


def test_make_case_is_deterministic_and_typed() -> None:
    image_a, label_a = make_case(SyntheticSpec(), 3)
    image_b, label_b = make_case(SyntheticSpec(), 3)
    assert image_a.shape == (1, 24, 64, 64) and image_a.dtype == np.float32
    assert label_a.shape == (24, 64, 64) and label_a.dtype == np.uint8
    assert image_a.tobytes() == image_b.tobytes()
    assert label_a.tobytes() == label_b.tobytes()


def test_different_seed_or_case_gives_different_data() -> None:
    image0, label0 = make_case(SyntheticSpec(seed=0), 0)
    image1, label1 = make_case(SyntheticSpec(seed=1), 0)
    image2, label2 = make_case(SyntheticSpec(seed=0), 1)
    assert not np.array_equal(image0, image1) and not np.array_equal(label0, label1)
    assert not np.array_equal(image0, image2) and not np.array_equal(label0, label2)


def test_adding_channels_keeps_first_channel_and_labels() -> None:
    image1, label1 = make_case(SyntheticSpec(num_channels=1), 0)
    image3, label3 = make_case(SyntheticSpec(num_channels=3), 0)
    assert image3.shape[0] == 3
    np.testing.assert_array_equal(image1[0], image3[0])
    np.testing.assert_array_equal(label1, label3)
    # every extra channel is a different intensity mapping of the same anatomy
    liver = label3 == 1
    liver_means = [float(image3[c][liver].mean()) for c in range(3)]
    assert min(abs(a - b) for i, a in enumerate(liver_means) for b in liver_means[i + 1:]) > 10


# ---------------------------------------------------------------------------- anatomy


@pytest.mark.parametrize("case_index", range(4))
def test_structures_disjoint_inside_body_and_all_labels_present(case_index: int) -> None:
    spec = SyntheticSpec()
    masks = _synthesize_structures(spec, case_index)
    labelled = [masks[n] for n in spec.label_names]
    assert sum(m.astype(int) for m in labelled).max() == 1, "labelled structures overlap"
    for name in spec.label_names:
        assert masks[name].sum() > 50, f"{name} too small or missing"
        assert not np.any(masks[name] & ~masks["body"]), f"{name} leaves the body"
    # organs are separated by at least a one-voxel gap (carving), the lesion sits in the liver
    for i, a in enumerate(spec.organs):
        for b in spec.organs[i + 1:]:
            assert not np.any(ndimage.binary_dilation(masks[a]) & masks[b]), f"{a} touches {b}"


@pytest.mark.parametrize("case_index", range(4))
def test_lesion_is_surrounded_by_liver(case_index: int) -> None:
    _, label = make_case(SyntheticSpec(), case_index)
    lesion = label == 4
    ring = ndimage.binary_dilation(lesion) & ~lesion
    assert lesion.sum() >= 30
    assert np.mean(label[ring] == 1) > 0.9
    # several voxels thick in every direction, even along the 3 mm z axis
    extent = [np.ptp(ax) + 1 for ax in np.nonzero(lesion)]
    assert min(extent) >= 3


def test_intensities_are_ct_like() -> None:
    image, label = make_case(SyntheticSpec(), 0)
    ct = image[0]
    corner = ct[:, :4, :4]
    assert abs(float(np.median(corner)) + 1000) < 30, "background should be air"
    means = {n: float(np.median(ct[label == v])) for v, n in enumerate(("background",) + SyntheticSpec().label_names)}
    assert means["lesion"] < means["liver"] - 20, "lesion must be hypodense"
    organ_means = sorted(means[o] for o in ORGANS)
    assert min(np.diff(organ_means)) > 15, f"organs need distinct means, got {means}"
    assert all(0 < means[o] < 250 for o in ORGANS)
    # texture differs: the smooth spleen is less variable than the grainy kidney
    stds = {o: float(ct[ndimage.binary_erosion(label == v)].std()) for v, o in enumerate(ORGANS, start=1)}
    assert stds["spleen"] < stds["kidney"]


def test_anatomy_is_defined_in_millimetres() -> None:
    """Halving the spacing while doubling the shape must give the same physical organ volumes."""
    coarse = SyntheticSpec(shape=(24, 64, 64), spacing=(3.0, 1.0, 1.0))
    fine = SyntheticSpec(shape=(48, 128, 128), spacing=(1.5, 0.5, 0.5))
    _, label_c = make_case(coarse, 0)
    _, label_f = make_case(fine, 0)
    vol_c = np.bincount(label_c.ravel(), minlength=5)[1:] * np.prod(coarse.spacing)
    vol_f = np.bincount(label_f.ravel(), minlength=5)[1:] * np.prod(fine.spacing)
    np.testing.assert_allclose(vol_c, vol_f, rtol=0.1)  # liver, kidney, spleen and lesion
    # the lesion lands at the same physical place on both grids
    centre = [np.mean(np.nonzero(lab == 4), axis=1) * np.array(s.spacing) for lab, s in ((label_c, coarse), (label_f, fine))]
    offset = [(np.array(s.shape) - 1) / 2 * np.array(s.spacing) for s in (coarse, fine)]
    assert np.linalg.norm((centre[0] - offset[0]) - (centre[1] - offset[1])) < 3.0  # mm


def test_organ_subset_and_label_ids() -> None:
    spec = SyntheticSpec(organs=("spleen", "liver"), with_lesion=False)
    assert spec.label_names == ("spleen", "liver")
    _, label = make_case(spec, 0)
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    full = _synthesize_structures(SyntheticSpec(with_lesion=False), 0)
    # the liver is the same anatomy whether or not other organs are drawn
    np.testing.assert_array_equal(label == 2, full["liver"])


def test_export_labels_only_exports_requested_structures() -> None:
    masks = _synthesize_structures(SyntheticSpec(), 0)
    label = _export_labels(masks, ["kidney"])
    np.testing.assert_array_equal(label == 1, masks["kidney"])
    assert set(np.unique(label).tolist()) == {0, 1}


# ---------------------------------------------------------------------------- writing


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("raw"), 7, "Synth",
                                   SyntheticSpec(num_training=3, num_test=1, spacing=(2.5, 0.8, 0.7)))


def test_folder_layout_and_dataset_json(written: pathlib.Path) -> None:
    assert written.name == dataset_folder_name(7, "Synth") == "Dataset007_Synth"
    ds = json.loads((written / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"}
    assert ds["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "lesion": 4}
    assert ds["numTraining"] == 3 and ds["file_ending"] == ".nii.gz"
    assert ds["nnunet_ext_synthetic"]["spec"]["spacing"] == [2.5, 0.8, 0.7]
    assert sorted(p.name for p in (written / "imagesTr").iterdir()) == [f"synth_00{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (written / "labelsTr").iterdir()) == [f"synth_00{i}.nii.gz" for i in range(3)]
    assert [p.name for p in (written / "imagesTs").iterdir()] == ["synth_003_0000.nii.gz"]
    assert [p.name for p in (written / "labelsTs").iterdir()] == ["synth_003.nii.gz"]
    assert not any(p.name.startswith(".") for p in written.parent.iterdir()), "temporary folder left behind"


class _SerialPool:
    """In-process stand-in for multiprocessing.Pool: spawning workers that import torch costs ~15 s."""

    def __enter__(self) -> "_SerialPool":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def starmap(self, func, iterable):  # noqa: ANN001 - mirrors Pool.starmap
        return [func(*args) for args in iterable]


class _SerialContext:
    def Pool(self, *args: object, **kwargs: object) -> _SerialPool:  # noqa: N802 - mirrors multiprocessing API
        return _SerialPool()


def test_passes_nnunet_integrity_check(written: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi

    # nnU-Net's own checks, run in-process (its worker functions are unchanged)
    monkeypatch.setattr(vdi.multiprocessing, "get_context", lambda method=None: _SerialContext())
    vdi.verify_dataset_integrity(str(written), num_processes=1)  # raises on any problem


def test_nnunet_integrity_check_catches_a_broken_label(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: the same check must fail when a label file holds an unknown value."""
    import SimpleITK as sitk
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi

    folder = write_synthetic_dataset(tmp_path, 14, spec=SMALL)
    path = folder / "labelsTr" / "synth_000.nii.gz"
    seg = sitk.ReadImage(str(path))
    broken = sitk.GetImageFromArray((sitk.GetArrayFromImage(seg) + 7).astype(np.uint8))
    broken.CopyInformation(seg)
    sitk.WriteImage(broken, str(path), True)
    monkeypatch.setattr(vdi.multiprocessing, "get_context", lambda method=None: _SerialContext())
    with pytest.raises(RuntimeError):
        vdi.verify_dataset_integrity(str(folder), num_processes=1)


def test_nnunet_reader_sees_spec_spacing_and_data(written: pathlib.Path) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    spec = SyntheticSpec(num_training=3, num_test=1, spacing=(2.5, 0.8, 0.7))
    images, props = SimpleITKIO().read_images([str(written / "imagesTr" / "synth_001_0000.nii.gz")])
    seg, seg_props = SimpleITKIO().read_seg(str(written / "labelsTr" / "synth_001.nii.gz"))
    np.testing.assert_allclose(props["spacing"], spec.spacing)
    np.testing.assert_allclose(seg_props["spacing"], spec.spacing)
    image, label = make_case(spec, 1)
    np.testing.assert_array_equal(images, image)
    np.testing.assert_array_equal(seg[0], label)


def test_every_label_in_every_training_case(written: pathlib.Path) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    expected = set(json.loads((written / "dataset.json").read_text())["labels"].values())
    for path in sorted((written / "labelsTr").iterdir()):
        seg, _ = SimpleITKIO().read_seg(str(path))
        assert set(np.unique(seg).astype(int).tolist()) == expected, path.name


def test_multichannel_writes_one_file_per_channel(tmp_path: pathlib.Path) -> None:
    spec = SyntheticSpec(num_training=2, num_test=1, num_channels=2)
    folder = write_synthetic_dataset(tmp_path, 8, spec=spec)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT", "1": "CT"}
    assert ds["nnunet_ext_synthetic"]["channel_phases"] == ["portal_venous", "arterial"]
    for split, cases in (("imagesTr", ("synth_000", "synth_001")), ("imagesTs", ("synth_002",))):
        names = sorted(p.name for p in (folder / split).iterdir())
        assert names == sorted(f"{c}_{ch:04d}.nii.gz" for c in cases for ch in range(2))
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    images, _ = SimpleITKIO().read_images([str(folder / "imagesTr" / f"synth_000_{c:04d}.nii.gz") for c in range(2)])
    assert images.shape == (2, 24, 64, 64) and not np.array_equal(images[0], images[1])


def test_rewrite_is_idempotent(tmp_path: pathlib.Path) -> None:
    first = write_synthetic_dataset(tmp_path, 9, spec=SMALL)
    before = _snapshot(first)
    second = write_synthetic_dataset(tmp_path, 9, spec=SMALL)
    assert second == first
    assert _snapshot(second) == before


def test_different_spec_on_existing_dataset_is_refused(tmp_path: pathlib.Path) -> None:
    folder = write_synthetic_dataset(tmp_path, 9, spec=SMALL)
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match="Dataset009_SyntheticAbdomen"):
        write_synthetic_dataset(tmp_path, 9, spec=SyntheticSpec(num_training=3, num_test=1, seed=5))
    assert _snapshot(folder) == before


def test_foreign_folder_is_never_touched(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "Dataset010_SyntheticAbdomen"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "dataset.json").write_text('{"labels": {"background": 0}}')
    (folder / "imagesTr" / "patient_0000.nii.gz").write_bytes(b"precious")
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match="Dataset010_SyntheticAbdomen"):
        write_synthetic_dataset(tmp_path, 10, spec=SMALL)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset010_SyntheticAbdomen"]


def test_same_id_with_other_name_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "Dataset011_Other").mkdir()
    with pytest.raises(FileExistsError, match="Dataset011_Other"):
        write_synthetic_dataset(tmp_path, 11, spec=SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset011_Other"]


def test_empty_existing_folder_is_filled(tmp_path: pathlib.Path) -> None:
    (tmp_path / "Dataset012_SyntheticAbdomen").mkdir()
    folder = write_synthetic_dataset(tmp_path, 12, spec=SMALL)
    assert (folder / "dataset.json").is_file()


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (8, 64, 64)}, "shape"),
        ({"shape": (24, 64)}, "shape"),
        ({"spacing": (3.0, 0.0, 1.0)}, "spacing"),
        ({"num_channels": 0}, "num_channels"),
        ({"num_training": 0}, "num_training"),
        ({"seed": -1}, "seed"),
        ({"organs": ("liver", "pancreas")}, r"pancreas.*\['liver', 'kidney', 'spleen'\]"),
        ({"organs": ()}, "organs"),
        ({"organs": ("liver", "liver")}, "organs"),
        ({"organs": ("kidney",)}, "with_lesion"),
    ],
)
def test_bad_spec_raises_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticSpec(**kwargs)


@pytest.mark.parametrize(("dataset_id", "name"), [(0, "A"), (1000, "A"), (5, ""), (5, "a/b"), (5, "has space")])
def test_bad_dataset_id_or_name(tmp_path: pathlib.Path, dataset_id: int, name: str) -> None:
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path, dataset_id, name, SMALL)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- figure


def _fake_case(name: str, seed: int, num_classes: int) -> dict:
    rng = np.random.default_rng(seed)
    reference = np.zeros((10, 32, 32), dtype=np.uint8)
    for value in range(1, num_classes + 1):
        z, y, x = rng.integers(2, 8), rng.integers(4, 24), rng.integers(4, 24)
        reference[z - 1:z + 2, y:y + 5, x:x + 5] = value
    prediction = np.roll(reference, 1, axis=2)
    image = rng.normal(size=reference.shape).astype(np.float32) + reference
    return {"name": name, "image": image, "reference": reference, "prediction": prediction,
            "dice": {f"class{v}": 0.5 for v in range(1, num_classes + 1)}}


@pytest.mark.parametrize("num_cases", [1, 2])
def test_overlay_figure_writes_png(tmp_path: pathlib.Path, num_cases: int) -> None:
    cases = [_fake_case(f"case{i}", i, num_classes=3) for i in range(num_cases)]
    out = save_overlay_figure(cases, tmp_path / "sub" / "overlay.png", {0: "background", 1: "a", 2: "b", 3: "c"})
    assert out == tmp_path / "sub" / "overlay.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_overlay_figure_with_real_case_and_empty_reference(tmp_path: pathlib.Path) -> None:
    image, label = make_case(SyntheticSpec(), 0)
    empty = np.zeros_like(label)
    cases = [
        {"name": "synth_000", "image": image[0], "reference": label, "prediction": label,
         "dice": {"liver": 1.0, "kidney": 1.0, "spleen": 1.0, "lesion": float("nan")}},
        {"name": "empty", "image": image[0], "reference": empty, "prediction": empty, "dice": {}},
    ]
    out = save_overlay_figure(cases, tmp_path / "real.png", dict(enumerate(("background",) + SyntheticSpec().label_names)))
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_overlay_figure_rejects_bad_input(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        save_overlay_figure([], tmp_path / "x.png", {1: "a"})
    bad = _fake_case("bad", 0, 1)
    bad["prediction"] = bad["prediction"][:5]
    with pytest.raises(ValueError, match="shape"):
        save_overlay_figure([bad], tmp_path / "x.png", {1: "a"})
    assert not (tmp_path / "x.png").exists()


def test_select_slices_prefers_foreground_and_new_classes() -> None:
    reference = np.zeros((24, 8, 8), dtype=np.uint8)
    reference[10:16] = 1  # big class on slices 10..15
    reference[12, :, :] = 1
    reference[3, 0, 0] = 2  # tiny class far away must still be shown
    chosen = select_slices(reference, 3)
    assert 12 in chosen and 3 in chosen and len(chosen) == 3 and chosen == sorted(chosen)
    assert select_slices(np.zeros((2, 4, 4), dtype=np.uint8), 3) == [0, 1]
