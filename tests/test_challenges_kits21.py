"""``nnunet-ext convert kits21`` and the engine it shares: layout, regions, checks, resume, parallelism."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from challenges_helpers import convert, read_array, tree_digest
from nnunet_ext.challenges import kits21
from nnunet_ext.challenges.replicas import kits_labels, write_kits21_replica, write_volume
from nnunet_ext.testing.harness import stock_command


@pytest.fixture
def release(tmp_path):
    return write_kits21_replica(tmp_path / "release", num_labelled=3, num_test=1)


def test_region_based_dataset_with_labels_copied_unchanged_and_source_untouched(monkeypatch, tmp_path, release,
                                                                                 capsys):
    before = tree_digest(release)
    assert convert(monkeypatch, tmp_path / "raw", "kits21", release, "-d", 301, "-np", 1) == 0
    folder = tmp_path / "raw" / "Dataset301_KiTS21"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert dataset["regions_class_order"] == [1, 3, 2]
    assert dataset["channel_names"] == {"0": "CT"} and dataset["numTraining"] == 3
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"case_0000{i}_0000.nii.gz" for i in range(3)]
    assert [p.name for p in (folder / "imagesTs").iterdir()] == ["case_00003_0000.nii.gz"]
    for i in range(3):
        source = release / f"case_0000{i}"
        assert (folder / "labelsTr" / f"case_0000{i}.nii.gz").read_bytes() == \
            (source / "aggregated_MAJ_seg.nii.gz").read_bytes()
        assert (folder / "imagesTr" / f"case_0000{i}_0000.nii.gz").read_bytes() == \
            (source / "imaging.nii.gz").read_bytes()
    assert tree_digest(release) == before
    out = capsys.readouterr().out
    assert "[4/4]" in out and "4 cases: 4 converted, 0 skipped" in out and "0 failed" in out


def test_nnunet_region_export_paints_kits_label_values():
    """Predictions of the region-based model come back as 1 kidney, 2 tumour, 3 cyst (what KiTS21 expects)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    dataset = kits21.dataset_json()
    manager = LabelManager(dataset["labels"], dataset["regions_class_order"])
    assert manager.has_regions and manager.all_labels == [0, 1, 2, 3]
    labels = kits_labels(np.random.default_rng(0))
    regions = np.stack([np.isin(labels, r) for r in ([1, 2, 3], [2, 3], [2])]).astype(np.float32)
    assert np.array_equal(manager.convert_probabilities_to_segmentation(regions), labels)


def test_geometry_mismatch_is_reported_and_skipped_never_resampled(monkeypatch, tmp_path, release, capsys):
    label = release / "case_00001" / "aggregated_MAJ_seg.nii.gz"
    write_volume(read_array(label), label, spacing=(0.8, 0.8, 3.0))
    assert convert(monkeypatch, tmp_path / "raw", "kits21", release, "-d", 302) == 1
    out = capsys.readouterr().out
    assert "failed case_00001: geometry of aggregated_MAJ_seg.nii.gz differs from imaging.nii.gz: spacing" in out
    folder = tmp_path / "raw" / "Dataset302_KiTS21"
    assert not (folder / "labelsTr" / "case_00001.nii.gz").exists()
    assert not (folder / "imagesTr" / "case_00001_0000.nii.gz").exists()
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


def test_missing_imaging_and_unexpected_label_values_are_reported(monkeypatch, tmp_path, release, capsys):
    (release / "case_00000" / "imaging.nii.gz").unlink()
    label = release / "case_00002" / "aggregated_MAJ_seg.nii.gz"
    write_volume(read_array(label) * 2, label)  # values 2, 4, 6: not KiTS labels
    assert convert(monkeypatch, tmp_path / "raw", "kits21", release, "-d", 303) == 1
    out = capsys.readouterr().out
    assert f"failed case_00000: missing {release / 'case_00000' / 'imaging.nii.gz'}" in out
    assert "failed case_00002: aggregated_MAJ_seg.nii.gz: unexpected label values [4, 6]" in out
    assert "4 cases: 2 converted, 0 skipped (already complete, verified), 2 failed" in out


def test_second_run_verifies_and_redoes_only_broken_outputs(monkeypatch, tmp_path, release, capsys):
    raw = tmp_path / "raw"
    assert convert(monkeypatch, raw, "kits21", release, "-d", 304) == 0
    folder = raw / "Dataset304_KiTS21"
    reference = tree_digest(folder)
    truncated = folder / "imagesTr" / "case_00000_0000.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:100])  # half-written
    (folder / "labelsTr" / "case_00002.nii.gz").unlink()
    stale = folder / "imagesTr" / ".case_00001_0000.nii.gz.partial-deadbeef"
    stale.write_bytes(b"interrupted")
    capsys.readouterr()
    assert convert(monkeypatch, raw, "kits21", release, "-d", 304) == 0
    out = capsys.readouterr().out
    assert "case_00000: converted" in out and "case_00002: converted" in out
    assert "case_00001: skipped (verified)" in out and "case_00003: skipped (verified)" in out
    assert not stale.exists()
    assert tree_digest(folder) == reference
    assert convert(monkeypatch, raw, "kits21", release, "-d", 304) == 0
    assert "0 converted, 4 skipped" in capsys.readouterr().out


def test_two_processes_give_the_same_dataset_as_one(monkeypatch, tmp_path, release):
    assert convert(monkeypatch, tmp_path / "one", "kits21", release, "-d", 305, "-np", 1) == 0
    assert convert(monkeypatch, tmp_path / "two", "kits21", release, "-d", 305, "-np", 2) == 0
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_link_mode_symlinks_to_the_source(monkeypatch, tmp_path, release):
    assert convert(monkeypatch, tmp_path / "raw", "kits21", release, "-d", 306, "--link") == 0
    link = tmp_path / "raw" / "Dataset306_KiTS21" / "labelsTr" / "case_00000.nii.gz"
    assert link.is_symlink() and os.readlink(link) == str(release / "case_00000" / "aggregated_MAJ_seg.nii.gz")


def test_refuses_a_folder_that_is_not_the_release_and_points_to_data(monkeypatch, tmp_path, release, capsys):
    repository = release.parent  # kits21/, not kits21/data/
    assert convert(monkeypatch, tmp_path / "raw", "kits21", repository, "-d", 307) == 2
    error = capsys.readouterr().err
    assert f"{repository} does not look like the KiTS21 release's data/ folder" in error
    assert f"Did you mean {release}?" in error
    assert not (tmp_path / "raw" / "Dataset307_KiTS21").exists()


def test_refuses_an_id_used_by_another_dataset_and_leaves_it_alone(monkeypatch, tmp_path, release, capsys):
    other = tmp_path / "raw" / "Dataset308_Liver"
    other.mkdir(parents=True)
    (other / "dataset.json").write_text("{}")
    assert convert(monkeypatch, tmp_path / "raw", "kits21", release, "-d", 308) == 2
    assert f"dataset id 308 is already used by {other}" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset308_Liver"]
    assert [p.name for p in other.iterdir()] == ["dataset.json"]


def test_refuses_a_same_named_folder_it_did_not_write(monkeypatch, tmp_path, release, capsys):
    foreign = tmp_path / "raw" / "Dataset309_KiTS21"
    foreign.mkdir(parents=True)
    (foreign / "dataset.json").write_text(json.dumps({"name": "someone else's"}))
    assert convert(monkeypatch, tmp_path / "raw", "kits21", release, "-d", 309) == 2
    assert "data not written by nnunet-ext convert" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["dataset.json"]


@pytest.mark.parametrize("challenge, options, form", [
    ("kits21", (), {}), ("amos22", ("--task", 2), {}), ("amos22", ("--task", 1), {"first_stage": True}),
    ("segrap2023", ("--task", "oar"), {}), ("segrap2023", ("--task", "gtv"), {})])
def test_nnunet_integrity_checks_accept_every_converted_dataset(monkeypatch, tmp_path, challenge, options, form):
    """nnU-Net's own per-case checks (those of --verify_dataset_integrity), in this process: fast, no workers."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_ext.challenges import replicas

    writer = {"kits21": replicas.write_kits21_replica, "amos22": replicas.write_amos22_replica,
              "segrap2023": replicas.write_segrap2023_replica}[challenge]
    assert convert(monkeypatch, tmp_path / "raw", challenge, writer(tmp_path / "release", **form), "-d", 311,
                   *options) == 0
    (folder,) = (p for p in (tmp_path / "raw").iterdir() if not p.name.startswith("."))  # not the run's lock file
    dataset = json.loads((folder / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(folder), dataset)
    assert len(cases) == dataset["numTraining"] > 0
    manager = LabelManager(dataset["labels"], dataset.get("regions_class_order"))
    reader = determine_reader_writer_from_dataset_json(dataset, cases[next(iter(cases))]["images"][0])
    for case in cases.values():
        assert len(case["images"]) == len(dataset["channel_names"])
        assert verify_labels(case["label"], reader, manager.all_labels)
        assert check_cases(case["images"], case["label"], len(dataset["channel_names"]), reader)


@pytest.mark.slow  # 100-135 s on the shared 2-core machine (nnU-Net's spawned workers each import torch)
def test_nnunet_plans_and_preprocesses_the_converted_region_dataset(tmp_path):
    """The stock command with --verify_dataset_integrity accepts the region-based dataset.json."""
    release = write_kits21_replica(tmp_path / "release", num_labelled=3, num_test=0, shape=(16, 32, 32))
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_compile="false",
               **{name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
    converted = subprocess.run([stock_command("nnunet-ext"), "convert", "kits21", str(release), "-d", "310",
                                "-np", "1"],
                               env=env, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    planned = subprocess.run([stock_command("nnUNetv2_plan_and_preprocess"), "-d", "310", "-c", "3d_fullres",
                              "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset310_KiTS21"
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    assert json.loads((preprocessed / "dataset.json").read_text())["regions_class_order"] == [1, 3, 2]
    assert len(list((preprocessed / "nnUNetPlans_3d_fullres").glob("case_*"))) >= 3
