"""imagesUnlabeled: the convention's checks, ``nnunet-ext preprocess-unlabeled``, the generator's unlabelled mode.

The central property: an image preprocessed as unlabelled gives exactly the arrays nnU-Net's own
preprocessing gives for the same image in imagesTr, and the labelled folder is never written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nnunet_ext import compat
from nnunet_ext.cli.main import main
from nnunet_ext.datasets.synthetic import SyntheticSpec, make_case, write_synthetic_dataset
from nnunet_ext.datasets.unlabeled import MARKER, write_unlabeled_images
from nnunet_ext.unlabeled.convention import (UnlabeledDataError, check_unique_case_names, list_unlabeled_cases,
                                             manifest_path, unlabeled_preprocessed_folder)
from nnunet_ext import atomic_io
from nnunet_ext.testing.hostile import temporaries
from nnunet_ext.unlabeled.preprocess import PROPERTIES_KEY, plans_stamp, preprocess_unlabeled, read_manifest
from semi_support import (COPIED_CASE, COPY_NAME, SEMI_DATASET_ID, nnunet_environment, semi_root,
                          unlabeled_cases)

CONFIG = "3d_fullres"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return semi_root(tmp_path_factory)


def folders(root):
    base = root.preprocessed / root.dataset_name
    return base / "nnUNetPlans_3d_fullres", unlabeled_preprocessed_folder(base, "nnUNetPlans_3d_fullres")


def load(folder: Path, identifier: str):
    data, seg, _, properties = compat.dataset_class_of_folder(folder)(str(folder), [identifier]).load_case(identifier)
    return np.asarray(data[:]), np.asarray(seg[:]), properties


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# the preprocessed arrays
# ---------------------------------------------------------------------------------------------
def test_unlabelled_arrays_equal_nnunets_for_the_same_image_in_imagesTr(root):
    labeled_folder, unlabeled_folder = folders(root)
    data_l, seg_l, props_l = load(labeled_folder, COPIED_CASE)
    data_u, seg_u, props_u = load(unlabeled_folder, COPY_NAME)
    assert data_u.dtype == data_l.dtype and data_u.shape == data_l.shape
    assert np.array_equal(data_u, data_l), "same image, same plans: resampling/normalisation must be identical"
    for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(props_u[key]), np.asarray(props_l[key])), key
    # the stored "segmentation" is nnU-Net's nonzero mask only: -1 exactly where the labelled case has -1
    assert set(np.unique(seg_u).tolist()) <= {-1, 0}
    assert np.array_equal(seg_u, np.where(seg_l == -1, -1, 0))
    assert len(np.unique(seg_l)) > 2, "the labelled case should have labels (else this test proves little)"
    assert props_u["class_locations"] and all(len(v) == 0 for v in props_u["class_locations"].values())
    assert PROPERTIES_KEY in props_u and PROPERTIES_KEY not in props_l


def test_layout_and_manifest(root):
    labeled_folder, unlabeled_folder = folders(root)
    manifest = read_manifest(unlabeled_folder)
    assert manifest_path(unlabeled_folder).parent == labeled_folder.parent  # next to the folder, not inside
    assert set(manifest["cases"]) == unlabeled_cases() and manifest["configuration"] == CONFIG
    identifiers = compat.dataset_class_of_folder(unlabeled_folder).get_identifiers(str(unlabeled_folder))
    assert set(identifiers) == unlabeled_cases()
    labeled = compat.dataset_class_of_folder(labeled_folder).get_identifiers(str(labeled_folder))
    assert not set(labeled) & unlabeled_cases(), "unlabelled cases must never appear among nnU-Net's labelled ones"
    assert not temporaries(labeled_folder.parent), "staging folders or temporary files were left behind"


def test_cli_rewrites_only_its_own_folder_in_parallel(root, capsys):
    labeled_folder, unlabeled_folder = folders(root)
    base = labeled_folder.parent
    protected = {name: checksums(base / name) if (base / name).is_dir() else hashlib.sha256(
        (base / name).read_bytes()).hexdigest() for name in [p.name for p in base.iterdir()]
        if not name.startswith(unlabeled_folder.name)}
    raw_before = checksums(root.dataset_raw)
    before = {p.name: p.stat().st_mtime_ns for p in unlabeled_folder.glob("*.pkl")}
    with nnunet_environment(root):
        assert main(["preprocess-unlabeled", "-d", str(SEMI_DATASET_ID), "-c", CONFIG, "-np", "2",
                     "--overwrite"]) == 0
    assert "4 unlabelled case(s)" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in unlabeled_folder.glob("*.pkl")}
    assert set(after) == set(before) and all(after[k] != before[k] for k in before), "--overwrite redoes every case"
    for name, value in protected.items():
        assert (checksums(base / name) if (base / name).is_dir() else
                hashlib.sha256((base / name).read_bytes()).hexdigest()) == value, f"{name} was modified"
    assert checksums(root.dataset_raw) == raw_before, "the raw dataset was modified"


def test_rerun_resumes_an_interrupted_run_and_redoes_cases_made_with_other_plans(root):
    _, unlabeled_folder = folders(root)
    # interrupted: one case without its properties (moved last), the staging folder of a killed run
    (unlabeled_folder / "synth_u001.pkl").unlink()
    dead = atomic_io._private_name(atomic_io.STAGING_PREFIX, f"{unlabeled_folder.name}.synth_u002").split(".")
    dead[3] = "999999999"  # a process id that does not exist: the run was killed
    leftover = unlabeled_folder.parent / ".".join(dead)
    leftover.mkdir()
    (leftover / "synth_u002.b2nd").write_bytes(b"half written")
    # made with other plans: a different stamp
    properties = compat.load_case_properties(unlabeled_folder / "synth_u000.pkl")
    properties[PROPERTIES_KEY]["stamp"] = "old-plans"
    compat.save_case_properties(properties, unlabeled_folder / "synth_u000.pkl")
    with nnunet_environment(root):
        (result,) = preprocess_unlabeled(SEMI_DATASET_ID, [CONFIG])
    assert set(result.processed) == {"synth_u001", "synth_u000"}
    assert set(result.cases) == unlabeled_cases()
    assert not leftover.exists() and not temporaries(unlabeled_folder.parent)
    with nnunet_environment(root):
        (again,) = preprocess_unlabeled(SEMI_DATASET_ID, [CONFIG])
    assert again.processed == (), "a complete folder is left as it is"


def test_plans_stamp_follows_what_decides_the_arrays_not_patch_or_batch_size():
    from types import SimpleNamespace

    configuration = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                     "spacing": [2.5, 1.0, 1.0], "normalization_schemes": ["CTNormalization"],
                     "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                     "resampling_fn_data_kwargs": {"order": 3}, "resampling_fn_seg": "resample_data_or_seg_to_shape",
                     "resampling_fn_seg_kwargs": {"order": 1}, "patch_size": [16, 40, 40], "batch_size": 2,
                     "architecture": {"network_class_name": "PlainConvUNet"}}
    plans = SimpleNamespace(plans={"foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}})
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}

    def stamp(**changes):
        return plans_stamp(plans, SimpleNamespace(configuration={**configuration, **changes}), dataset_json)

    assert stamp(patch_size=[32, 64, 64], batch_size=4, architecture={"network_class_name": "Other"}) == stamp()
    for change in ({"spacing": [3.0, 1.0, 1.0]}, {"normalization_schemes": ["ZScoreNormalization"]},
                   {"resampling_fn_data_kwargs": {"order": 1}}, {"data_identifier": "other"}):
        assert stamp(**change) != stamp(), change


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_plans_or_configuration_not_preprocessed_names_the_command(root):
    with nnunet_environment(root):
        with pytest.raises(UnlabeledDataError, match="nnUNetv2_plan_and_preprocess -d 993"):
            preprocess_unlabeled(SEMI_DATASET_ID, [CONFIG], plans_identifier="NoSuchPlans")
        with pytest.raises(UnlabeledDataError, match=r"nnUNetv2_preprocess -d 993 -plans_name nnUNetPlans -c 2d"):
            preprocess_unlabeled(SEMI_DATASET_ID, ["2d"])
        with pytest.raises(UnlabeledDataError, match="3d_nonsense.*3d_fullres"):
            preprocess_unlabeled(SEMI_DATASET_ID, ["3d_nonsense"])


def test_cli_prints_errors_without_traceback(tmp_path, capsys, monkeypatch):
    raw, preprocessed = tmp_path / "raw", tmp_path / "pre"
    for base in (raw, preprocessed):
        (base / "Dataset994_NoUnlabelled").mkdir(parents=True)
        (base / "Dataset994_NoUnlabelled" / "dataset.json").write_text(json.dumps(
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    assert main(["preprocess-unlabeled", "-d", "994", "-c", CONFIG]) == 2
    error = capsys.readouterr().err
    assert "No imagesUnlabeled folder in" in error and "Traceback" not in error


def _dataset_json(channels: int) -> dict:
    return {"channel_names": {str(c): "CT" for c in range(channels)}, "file_ending": ".nii.gz"}


def _touch(folder: Path, *names: str) -> None:
    (folder / "imagesUnlabeled").mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / "imagesUnlabeled" / name).write_bytes(b"")


@pytest.mark.parametrize("names, channels, message", [
    ([], 1, "holds no images"),
    (["a_0000.nii.gz", "scan.nii.gz"], 1, r"scan.nii.gz .*lacks the 4-digit channel index. Rename it to scan_0000"),
    (["a_0000.nii.gz", "a_0001.nii.gz"], 1, r"a_0001.nii.gz has channel 0001, but dataset.json lists 1 channel"),
    (["a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"], 2, r"Case 'a' .*lacks channel file\(s\) a_0001.nii.gz"),
    (["a_0000.nii.gz", "notes.txt"], 1, r"notes.txt is not an image with the dataset's file ending"),
    (["a_seg_0000.nii.gz"], 1, "may not end in '_seg'"),
])
def test_convention_errors_name_the_file_and_the_fix(tmp_path, names, channels, message):
    _touch(tmp_path, *names)
    with pytest.raises(UnlabeledDataError, match=message):
        list_unlabeled_cases(tmp_path, _dataset_json(channels))


def test_convention_lists_cases_in_channel_order_and_ignores_hidden_files(tmp_path):
    _touch(tmp_path, "b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", ".DS_Store")
    cases = list_unlabeled_cases(tmp_path, _dataset_json(2))
    assert [c.identifier for c in cases] == ["a", "b"]
    assert [p.name for p in cases[1].files] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    with pytest.raises(UnlabeledDataError, match="No imagesUnlabeled folder"):
        list_unlabeled_cases(tmp_path / "elsewhere", _dataset_json(1))


def test_the_labelled_reference_is_the_first_training_case_of_imagesTr_or_of_dataset_json(tmp_path):
    from nnunet_ext.unlabeled.preprocess import first_training_case

    (tmp_path / "imagesTr").mkdir()
    for name in ("b_0000.nii.gz", "b_0001.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "c_0000.nii.gz"):
        (tmp_path / "imagesTr" / name).write_bytes(b"x")
    identifier, files = first_training_case(tmp_path, _dataset_json(2))
    assert identifier == "a" and [f.name for f in files] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    (tmp_path / "imagesTr" / "a_0001.nii.gz").unlink()
    assert first_training_case(tmp_path, _dataset_json(2)) is None  # incomplete: not a reference
    listed = {**_dataset_json(1), "dataset": {"z": {"images": ["imagesTr/b_0001.nii.gz"], "label": "l.nii.gz"}}}
    assert first_training_case(tmp_path, listed) == ("z", [tmp_path / "imagesTr" / "b_0001.nii.gz"])


def test_unlabelled_names_that_are_labelled_cases_are_refused(tmp_path):
    with pytest.raises(UnlabeledDataError, match="synth_000.*also labelled cases"):
        check_unique_case_names(["synth_000", "u1"], ["synth_000", "synth_001"], tmp_path)
    check_unique_case_names(["u1"], ["synth_000"], tmp_path)


# ---------------------------------------------------------------------------------------------
# the generator's unlabelled mode
# ---------------------------------------------------------------------------------------------
SMALL = SyntheticSpec(num_training=2, num_test=1, shape=(16, 32, 32), num_channels=2)


def test_generator_writes_new_images_and_is_idempotent(tmp_path):
    raw = tmp_path / "raw"
    write_synthetic_dataset(raw, 995, "Gen", SMALL)
    folder = write_unlabeled_images(raw, 995, "Gen", SMALL, 2)
    dataset_json = json.loads((folder.parent / "dataset.json").read_text())
    cases = list_unlabeled_cases(folder.parent, dataset_json)  # follows our own convention
    assert [c.identifier for c in cases] == ["synth_u000", "synth_u001"] and len(cases[0].files) == 2
    assert not (folder.parent / "labelsUnlabeled").exists()
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].files[0])))
    assert image.shape == SMALL.shape
    assert np.allclose(image, make_case(SMALL, 3)[0][0])  # index after the 2 training + 1 test cases
    training = sitk.GetArrayFromImage(sitk.ReadImage(str(folder.parent / "imagesTr" / "synth_000_0000.nii.gz")))
    assert not np.allclose(image, training)
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert write_unlabeled_images(raw, 995, "Gen", SMALL, 2) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp, "an identical rerun rewrote files"


def test_generator_refuses_a_foreign_imagesUnlabeled(tmp_path):
    raw = tmp_path / "raw"
    dataset = write_synthetic_dataset(raw, 996, "Gen", SMALL)
    (dataset / "imagesUnlabeled").mkdir()
    (dataset / "imagesUnlabeled" / "mine_0000.nii.gz").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="left untouched"):
        write_unlabeled_images(raw, 996, "Gen", SMALL, 2)
    assert (dataset / "imagesUnlabeled" / "mine_0000.nii.gz").read_bytes() == b"user data"
    assert not (dataset / "imagesUnlabeled" / MARKER).exists()
    shutil.rmtree(dataset / "imagesUnlabeled")
    write_unlabeled_images(raw, 996, "Gen", SMALL, 1)
    with pytest.raises(FileExistsError):  # another count is another dataset
        write_unlabeled_images(raw, 996, "Gen", SMALL, 2)
