"""One image I/O path (nnunet_ext.image_io) and one raw-dataset writer (nnunet_ext.raw_dataset).

The proof that merge and preprocess-unlabeled read and write through the reader/writer nnU-Net picks
for the dataset: tiny datasets in three formats nnU-Net reads, each through another class:
2D ``.png`` (NaturalImage2DIO), 3D ``.nrrd`` (SimpleITKIO) and ``.nii.gz`` with
``overwrite_image_reader_writer: NibabelIO`` and a flipped, sheared affine (ITK refuses to read such a
file: "only supports orthonormal direction cosines", so any SimpleITK read or write on the way fails).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_ext import atomic_io, compat, image_io, raw_dataset
from nnunet_ext.tasks.merge import MergeError, merge_datasets
from nnunet_ext.testing.hostile import temporaries

AFFINE = np.array([[-0.8, 0.15, 0.0, 10.0], [0.0, 0.8, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
FORMATS = {
    # name: (file ending, overwrite_image_reader_writer, the reader/writer nnU-Net picks, spatial shape)
    "png": (".png", None, "NaturalImage2DIO", (24, 24)),
    "nrrd": (".nrrd", None, "SimpleITKIO", (16, 16, 16)),
    "nibabel": (".nii.gz", "NibabelIO", "NibabelIO", (16, 16, 16)),
}
ALPHA = {"background": 0, "liver": 1}
BETA = {"background": 0, "spleen": 1, "liver": 2}  # liver has another value than in Alpha


def _write(fmt: str, array: np.ndarray, path: Path) -> Path:
    """``array`` in nnU-Net's (z, y, x) order ((y, x) for png) as ``fmt``'s own library writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        from skimage import io

        io.imsave(path, array.astype(np.uint8), check_contrast=False)
    elif fmt == "nrrd":
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.0))
        image.SetOrigin((1.0, 2.0, 3.0))
        sitk.WriteImage(image, str(path), True)
    else:
        import nibabel

        nibabel.save(nibabel.Nifti1Image(array.transpose(2, 1, 0), AFFINE), str(path))
    return path


def _label(shape: tuple[int, ...], values: list[int]) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for k, value in enumerate(values):
        label[2 + 4 * k: 5 + 4 * k] = value
    return label


def _image(shape: tuple[int, ...], seed: int, label: np.ndarray) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, 5.0, shape)
    return np.clip(60.0 + 40.0 * label + noise, 0, 255).astype(np.float32)


def make_source(raw: Path, dataset_id: int, name: str, fmt: str, channels: int, labels: dict, train: int = 3,
                test: int = 1, unlabeled: int = 0) -> Path:
    """A tiny raw dataset in ``fmt`` (imagesTr/labelsTr/imagesTs, optionally imagesUnlabeled)."""
    ending, reader, _, shape = FORMATS[fmt]
    folder = raw / raw_dataset.folder_name(dataset_id, name)
    values = sorted(v for v in labels.values() if v)
    for i in range(train + test + unlabeled):
        split = "Tr" if i < train else "Ts" if i < train + test else "Unlabeled"
        label = _label(shape, values if i % 2 == 0 else values[::-1])
        for c in range(channels):
            _write(fmt, _image(shape, 100 * dataset_id + 10 * i + c, label),
                   folder / f"images{split}" / f"c{i}_{c:04d}{ending}")
        if split == "Tr":
            _write(fmt, label, raw_dataset.label_file(folder, f"c{i}", ending))
    content = raw_dataset.dataset_json({str(c): "MRI" for c in range(channels)}, labels, train, ending,
                                       overwrite_image_reader_writer=reader)
    (folder / "dataset.json").write_text(json.dumps(content))
    return folder


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_fingerprint_sample(monkeypatch) -> None:
    """nnU-Net samples 10^7 foreground voxels per dataset for its intensity statistics (seconds of CPU for
    any image size); they only matter for CT normalisation, which these MRI channels do not use."""
    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as extractor

    original = extractor.DatasetFingerprintExtractor.__init__

    def init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003 - nnU-Net's signature
        original(self, *args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = 10_000

    monkeypatch.setattr(extractor.DatasetFingerprintExtractor, "__init__", init)


def _nnunet_accepts(folder: Path, monkeypatch) -> None:
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi

    with compat.pools_in_this_process():
        vdi.verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


# ---------------------------------------------------------------------------- merge in every format


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merge_reads_and_writes_with_the_datasets_reader_writer(tmp_path: Path, fmt: str, monkeypatch) -> None:
    ending, reader_name, expected_class, shape = FORMATS[fmt]
    raw = tmp_path / "nnUNet_raw"
    alpha = make_source(raw, 1, "Alpha", fmt, 1, ALPHA)
    beta = make_source(raw, 2, "Beta", fmt, 2, BETA)
    sources = {"Alpha": _checksums(alpha), "Beta": _checksums(beta)}
    result = merge_datasets(raw, [1, 2], 900, "Out")
    assert (result.linked, result.padded, result.labels) == (4 + 8, 4, 6)
    merged = json.loads((result.folder / "dataset.json").read_text())
    assert merged["file_ending"] == ending and merged.get("overwrite_image_reader_writer") == reader_name
    assert merged["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    rw = image_io.reader_writer(merged, result.folder / "imagesTr" / f"T00Alpha_c0_0000{ending}")
    assert type(rw).__name__ == expected_class

    for split, case in (("Tr", "c1"), ("Ts", "c3")):
        reference = alpha / f"images{split}" / f"{case}_0000{ending}"
        padded = raw_dataset.image_file(result.folder, f"T00Alpha_{case}", 1, ending, split)
        zeros, properties = image_io.read_images([padded], rw)
        data, expected = image_io.read_images([reference], rw)
        assert zeros.shape == data.shape and not zeros.any(), padded.name
        assert np.allclose(properties["spacing"], expected["spacing"])
        if fmt == "nibabel":  # the zero image keeps the reference's affine exactly as nibabel reads it
            assert np.allclose(properties["nibabel_stuff"]["original_affine"], AFFINE)
        if fmt == "nrrd":
            assert properties["sitk_stuff"] == expected["sitk_stuff"]

    for i in range(3):  # Beta's labels remapped: its liver (2) is merged liver 1, its spleen (1) is 2
        source, _ = image_io.read_segmentation(beta / "labelsTr" / f"c{i}{ending}", rw)
        target, target_properties = image_io.read_segmentation(result.folder / "labelsTr" / f"T01Beta_c{i}{ending}",
                                                               rw)
        np.testing.assert_array_equal(target, np.choose(source, [0, 2, 1]))
        assert (source == 2).any() and (source == 1).any()
        assert np.allclose(target_properties["spacing"], image_io.read_segmentation(
            beta / "labelsTr" / f"c{i}{ending}", rw)[1]["spacing"])
    assert {"Alpha": _checksums(alpha), "Beta": _checksums(beta)} == sources, "a source was modified"
    _nnunet_accepts(result.folder, monkeypatch)


def test_tiff3d_sources_are_refused_with_the_reason(tmp_path: Path) -> None:
    folder = make_source(tmp_path, 1, "Nrrd", "nrrd", 1, ALPHA)
    content = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**content, "overwrite_image_reader_writer": "Tiff3DIO"}))
    with pytest.raises(MergeError, match=r"Dataset001_Nrrd is read with Tiff3DIO.*<case>\.json.*Convert"):
        merge_datasets(tmp_path, [1], 900, "Out")
    assert not (tmp_path / "Dataset900_Out").exists()


# ---------------------------------------------------------------------------- preprocess-unlabeled in every format


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_preprocess_unlabeled_equals_nnunets_preprocessing_in_every_format(tmp_path: Path, fmt: str,
                                                                         monkeypatch) -> None:
    """nnU-Net plans and preprocesses a tiny dataset in ``fmt`` (its own functions, in this process); its first
    training image, copied into imagesUnlabeled, gives the arrays of the labelled case."""
    from nnunet_ext.unlabeled.convention import unlabeled_preprocessed_folder
    from nnunet_ext.unlabeled.preprocess import preprocess_unlabeled

    ending, _, _, shape = FORMATS[fmt]
    configuration = "2d" if len(shape) == 2 else "3d_fullres"
    roots = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in roots.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    dataset = make_source(roots["nnUNet_raw"], 41, "Formats", fmt, 1, ALPHA, train=2, test=0, unlabeled=1)
    (dataset / "imagesUnlabeled" / f"copy_of_c0_0000{ending}").write_bytes(
        (dataset / "imagesTr" / f"c0_0000{ending}").read_bytes())
    _small_fingerprint_sample(monkeypatch)
    compat.extract_fingerprint(41, 0, check_integrity=False)
    plans = compat.plan_dataset(41, compat.nnunet_planner_class("ExperimentPlanner"))
    compat.preprocess(41, plans, [configuration], 0)
    (result,) = preprocess_unlabeled(41, [configuration], plans)
    assert set(result.processed) == {"c2", "copy_of_c0"}

    preprocessed = roots["nnUNet_preprocessed"] / dataset.name
    labelled = preprocessed / f"{plans}_{configuration}"
    unlabelled = unlabeled_preprocessed_folder(preprocessed, labelled.name)
    assert unlabelled == result.folder

    def load(folder: Path, identifier: str):
        data, seg, _, properties = compat.dataset_class_of_folder(folder)(str(folder), [identifier]).load_case(
            identifier)
        return np.asarray(data[:]), np.asarray(seg[:]), properties

    data_l, seg_l, props_l = load(labelled, "c0")
    data_u, seg_u, props_u = load(unlabelled, "copy_of_c0")
    assert data_u.shape == data_l.shape and np.array_equal(data_u, data_l)
    assert np.array_equal(np.asarray(props_u["spacing"]), np.asarray(props_l["spacing"]))
    assert set(np.unique(seg_u).tolist()) <= {-1, 0}
    assert not temporaries(preprocessed)


# ---------------------------------------------------------------------------- the zero-channel rule


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_zero_channel_lies_on_the_reference_grid_as_the_reader_reads_it(tmp_path: Path, fmt: str) -> None:
    ending, reader_name, _, shape = FORMATS[fmt]
    reference = _write(fmt, _image(shape, 0, _label(shape, [1])), tmp_path / f"r_0000{ending}")
    rw = image_io.reader_writer({"file_ending": ending, "overwrite_image_reader_writer": reader_name}, reference)
    target = tmp_path / f"r_0001{ending}"
    image_io.write_zero_channel(reference, target, rw)
    zeros, properties = image_io.read_images([target], rw)
    data, expected = image_io.read_images([reference], rw)
    assert zeros.shape == data.shape and not zeros.any()
    assert np.allclose(properties["spacing"], expected["spacing"])
    # nnU-Net reads the two as one case: same grid for its own multi-file read
    both, _ = image_io.read_images([reference, target], rw)
    assert both.shape[0] == 2 and not temporaries(tmp_path)


def test_zero_channel_of_a_simpleitk_file_keeps_the_pixel_type_from_the_header(tmp_path: Path) -> None:
    import SimpleITK as sitk

    reference = _write("nrrd", np.ones((4, 6, 8), dtype=np.int16), tmp_path / "r_0000.nrrd")
    image_io.write_zero_channel(reference, tmp_path / "r_0001.nrrd")  # default: nnU-Net's reader for .nrrd
    zero, original = sitk.ReadImage(str(tmp_path / "r_0001.nrrd")), sitk.ReadImage(str(reference))
    assert zero.GetPixelID() == original.GetPixelID() == sitk.sitkInt16
    assert (zero.GetSize(), zero.GetSpacing(), zero.GetOrigin()) == \
        (original.GetSize(), original.GetSpacing(), original.GetOrigin())
    assert not sitk.GetArrayFromImage(zero).any()


# ---------------------------------------------------------------------------- image_io details


def test_segmentations_round_trip_through_every_reader_writer(tmp_path: Path) -> None:
    for fmt, (ending, reader_name, _, shape) in FORMATS.items():
        reference = _write(fmt, _label(shape, [1, 2]), tmp_path / f"{fmt}{ending}")
        rw = image_io.reader_writer({"file_ending": ending, "overwrite_image_reader_writer": reader_name}, reference)
        values, properties = image_io.read_segmentation(reference, rw)
        assert values.dtype == np.int64 and set(np.unique(values).tolist()) == {0, 1, 2}
        lut = np.array([0, 7, 3])
        image_io.relabel_segmentation(reference, tmp_path / f"{fmt}_out{ending}", lut, rw)
        out, out_properties = image_io.read_segmentation(tmp_path / f"{fmt}_out{ending}", rw)
        np.testing.assert_array_equal(out, lut[values])
        assert np.allclose(out_properties["spacing"], properties["spacing"])
        with pytest.raises(ValueError, match=r"value\(s\) \[2\] without a mapping"):
            image_io.relabel_segmentation(reference, tmp_path / f"{fmt}_bad{ending}", np.array([0, 1, -1]), rw)
        assert not (tmp_path / f"{fmt}_bad{ending}").exists()
    assert not temporaries(tmp_path)


def test_a_writer_with_side_files_writes_each_atomically_the_image_last(tmp_path: Path) -> None:
    """Tiff3DIO writes the spacing into ``<name>.json`` beside the image; both land under the target's name."""
    rw = image_io.reader_writer({"file_ending": ".tif", "overwrite_image_reader_writer": "Tiff3DIO"}, "x.tif")
    assert type(rw).__name__ == "Tiff3DIO"
    image_io.write_segmentation(np.ones((3, 4, 5), dtype=np.uint8), tmp_path / "case.tif", {"spacing": [2, 1, 1]}, rw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "case.tif"]
    assert json.loads((tmp_path / "case.json").read_text())["spacing"] == [2, 1, 1]
    values, properties = image_io.read_segmentation(tmp_path / "case.tif", rw)
    assert values.shape == (3, 4, 5) and values.all() and list(properties["spacing"]) == [2, 1, 1]


def test_a_failing_write_leaves_nothing(tmp_path: Path) -> None:
    class Broken:
        def write_seg(self, seg, output_fname, properties):  # noqa: ANN001 - nnU-Net's signature
            Path(output_fname).write_bytes(b"half")
            raise OSError("disk full")

    for rw in (Broken(), type("NibabelIO", (Broken,), {})()):  # the scratch-folder route and the direct one
        with pytest.raises(OSError, match="disk full"):
            image_io.write_segmentation(np.zeros((1, 2, 2)), tmp_path / "x.nii.gz", {}, rw)
    assert list(tmp_path.iterdir()) == []


def test_header_reading_does_not_decode(tmp_path: Path) -> None:
    path = _write("nrrd", np.zeros((4, 6, 8), dtype=np.float32), tmp_path / "h.nrrd")
    header = image_io.read_header(path)
    assert header.size == (8, 6, 4) and header.spacing == (0.8, 0.8, 2.0) and header.components == 1
    assert header.pixel_type == "32-bit float"


# ---------------------------------------------------------------------------- raw_dataset


def test_dataset_json_keeps_nnunets_keys_first_and_optional_ones_only_when_given() -> None:
    content = raw_dataset.dataset_json({"0": "CT"}, {"background": 0, "a": 1}, 3, ".nii.gz", name="X",
                                       extra={"tasks": {}})
    assert list(content) == ["name", "channel_names", "labels", "numTraining", "file_ending", "tasks"]
    assert "overwrite_image_reader_writer" in raw_dataset.dataset_json({}, {}, 0, ".png",
                                                                       overwrite_image_reader_writer="NibabelIO")


def test_layout_names_and_ids(tmp_path: Path) -> None:
    assert raw_dataset.folder_name(7, "Liver") == "Dataset007_Liver"
    assert raw_dataset.image_file("D", "c1", 2, ".png", "Ts") == Path("D/imagesTs/c1_0002.png")
    assert raw_dataset.label_file("D", "c1", ".nii.gz") == Path("D/labelsTr/c1.nii.gz")
    assert raw_dataset.is_valid_name("Abc_1-x") and not raw_dataset.is_valid_name("a b") and \
        not raw_dataset.is_valid_name("_x") and not raw_dataset.is_valid_name(None)
    (tmp_path / "Dataset007_Liver").mkdir()
    (tmp_path / "Dataset007_Other").mkdir()
    assert raw_dataset.other_folders_with_id(tmp_path, 7, "Dataset007_Liver") == ["Dataset007_Other"]
    assert raw_dataset.other_folders_with_id(tmp_path / "missing", 7, "x") == []


def test_place_file_links_copies_and_never_writes_the_source(tmp_path: Path) -> None:
    source = tmp_path / "s.nii.gz"
    source.write_bytes(b"image")
    assert raw_dataset.place_file(source, tmp_path / "hard", raw_dataset.HARDLINK) == "linked"
    assert (tmp_path / "hard").stat().st_ino == source.stat().st_ino
    assert raw_dataset.place_file(source, tmp_path / "soft", raw_dataset.SYMLINK) == "linked"
    assert (tmp_path / "soft").is_symlink() and (tmp_path / "soft").read_bytes() == b"image"
    assert raw_dataset.place_file(source, tmp_path / "copy", raw_dataset.COPY) == "copied"
    assert (tmp_path / "copy").stat().st_ino != source.stat().st_ino
    with pytest.raises(ValueError, match="mode must be"):
        raw_dataset.place_file(source, tmp_path / "x", "move")
    assert source.read_bytes() == b"image" and not temporaries(tmp_path)


def test_new_dataset_folder_appears_complete_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "Dataset001_A"
    with pytest.raises(KeyboardInterrupt):
        with raw_dataset.new_dataset_folder(target, ["imagesTr", "labelsTr"]) as staging:
            raw_dataset.write_dataset_json(staging, {"a": 1})
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    target.mkdir()  # an empty folder made beforehand is replaced
    with raw_dataset.new_dataset_folder(target, ["imagesTr", "labelsTr"]) as staging:
        raw_dataset.write_case_arrays(staging, "c0", [np.zeros((2, 3, 4), np.float32)], np.zeros((2, 3, 4), np.uint8),
                                      (2.0, 1.0, 1.0), ".nii.gz")
        raw_dataset.write_dataset_json(staging, {"a": 1})
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "dataset.json", "imagesTr", "imagesTr/c0_0000.nii.gz", "labelsTr", "labelsTr/c0.nii.gz"]
    assert raw_dataset.count_training_cases(target, ".nii.gz") == 1
    assert not [p for p in tmp_path.iterdir() if atomic_io.is_temporary(p)]
