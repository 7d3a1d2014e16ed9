"""``nnunet-ext predict --task`` has what users rely on in ``nnUNetv2_predict`` (issue 19), on a real model.

A random-weight universal nnU-Net (two folds, :func:`predict_support.random_weight_model`) on the
session's merged synthetic family, three training cases of the 2-channel source as input:

* one task equals nnU-Net's own route (its predictor on the merged dataset's padded images with the
  network set to the task, ``NNUNET_EXT_TASK``'s route): label maps identical after the export to the
  task's values, probabilities equal to nnU-Net's restricted to the task's labels (two folds; mirroring
  is compared with nnU-Net's own route in tests/test_predict_all_tasks.py);
* ``-num_parts 2`` over two calls writes what one call writes; ``--continue_prediction`` predicts only
  the cases whose files are missing;
* ``--save_probabilities`` writes what ``nnUNetv2_ensemble`` ensembles (its function, on two folds'
  folders: its maps are the argmax of the averaged probabilities), and what
  ``nnUNetv2_evaluate_folder GT OUT -djfile OUT/dataset.json -pfile OUT/plans.json`` runs evaluates;
* ``--task all`` with those options writes per task what ``--task T`` writes.

The calls use nnU-Net's sequential route (``-npp 0 -nps 0``, no spawned processes); the route through
nnU-Net's preprocessing and export processes (the writer pickled to them) runs in
tests/test_universal.py (``nnunet-ext predict`` as a command) and in the slow all-task command test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ext.datasets.multi_dataset import DEFAULT_DATASET_IDS, DEFAULT_SOURCES
from nnunet_ext.tasks.task_map import TaskMap
from nnunet_ext.testing.hostile import run_cli
from predict_support import outputs, random_weight_model

SOURCE = 1  # SynthLiverSpleenLesion: 2 channels (padded to the merged 4), liver 1, spleen 2, lesion 3
TASK = DEFAULT_SOURCES[SOURCE].name
CASES = 3
ARGS_FILE = "predict_from_raw_data_args.json"


@pytest.fixture(scope="module")
def model(universal_root, tmp_path_factory) -> Path:
    return random_weight_model(universal_root, "nnUNetUniversalTrainer", tmp_path_factory.mktemp("parity_model"))


@pytest.fixture(scope="module")
def source(universal_root) -> Path:
    return next(universal_root.raw.glob(f"Dataset{DEFAULT_DATASET_IDS[SOURCE]:03d}_*"))


@pytest.fixture(scope="module")
def case_ids(source: Path) -> list[str]:
    return sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))[:CASES]


@pytest.fixture(scope="module")
def images(source: Path, case_ids: list[str], tmp_path_factory) -> Path:
    """The task's own images (2 channels) of the first training cases."""
    folder = tmp_path_factory.mktemp("parity_images")
    for case in case_ids:
        for image in (source / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(image, folder / image.name)
    return folder


def _predict(model: Path, images: Path, output: Path, *extra: str, task: str = TASK):
    outcome = run_cli(["predict", "--task", task, "-i", str(images), "-o", str(output), "-m", str(model),
                       "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar", *extra])
    assert outcome.returncode == 0, outcome.output
    return outcome


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_one_task_equals_nnunets_own_prediction_in_the_tasks_label_space(universal_root, model: Path, images: Path,
                                                                        case_ids: list[str], tmp_path: Path) -> None:
    from nnunet_ext import compat
    from nnunet_ext.tasks.predict import task_conditioned_network

    ours = tmp_path / "ours"
    _predict(model, images, ours, "--save_probabilities", "-f", "0", "1", "--disable_tta")
    # nnU-Net's own route: the merged dataset's images of the same cases (padded by merge), its predictor
    # with the network set to the task, labels and probabilities in the merged label space
    task = TaskMap.from_dataset_json(model / "dataset.json").task(TASK)
    padded = tmp_path / "padded"
    padded.mkdir()
    for case in case_ids:
        for image in (universal_root.dataset_raw / "imagesTr").glob(f"{task.case_prefix}{case}_*.nii.gz"):
            shutil.copy(image, padded / image.name[len(task.case_prefix):])
    predictor = compat.predictor(0.5, False, torch.device("cpu"))
    predictor.allow_tqdm = False
    predictor.initialize_from_trained_model_folder(str(model), (0, 1))
    task_conditioned_network(predictor, model).set_task(task.task_id)
    reference = tmp_path / "reference"
    reference.mkdir()
    predictor.predict_from_files_sequential(str(padded), str(reference), save_probabilities=True, overwrite=True)

    merged_of_label = [merged for merged, value in sorted(task.to_source.items(), key=lambda item: item[1])]
    to_source = TaskMap.from_dataset_json(model / "dataset.json").to_source_lut(TASK)
    for case in case_ids:
        expected = to_source[_read(reference / f"{case}.nii.gz")]
        assert np.array_equal(_read(ours / f"{case}.nii.gz"), expected), case
        assert len(np.unique(expected)) > 1, case  # random weights still segment something
        merged = np.load(reference / f"{case}.npz")["probabilities"]
        probabilities = np.load(ours / f"{case}.npz")["probabilities"]
        kept = merged[merged_of_label]
        assert probabilities.shape == kept.shape and probabilities.dtype == np.float32
        assert np.allclose(probabilities, kept / kept.sum(0), atol=1e-5), case
        assert merged.sum(0).min() > 0.999 and kept.sum(0).min() > 0.999  # the masked class: ~0 in nnU-Net's
    written = json.loads((ours / "dataset.json").read_text())
    assert written["labels"] == task.source_labels and written["file_ending"] == ".nii.gz"
    assert (ours / "plans.json").read_bytes() == (model / "plans.json").read_bytes()


def test_num_parts_over_two_calls_equals_one_call_and_continue_does_only_the_missing(
        model: Path, images: Path, case_ids: list[str], tmp_path: Path) -> None:
    options = ["-f", "0", "--disable_tta", "--save_probabilities"]
    one = tmp_path / "one"
    _predict(model, images, one, *options)
    parts = tmp_path / "parts"
    for part, cases in ((0, case_ids[0::2]), (1, case_ids[1::2])):
        outcome = _predict(model, images, parts, *options, "-num_parts", "2", "-part_id", str(part))
        assert f"Predicted {len(cases)} case(s) (part {part} of 2)" in outcome.stdout
    assert outputs(parts) == outputs(one)
    arguments = json.loads((parts / ARGS_FILE).read_text())
    assert (arguments["num_parts"], arguments["part_id"], arguments["overwrite"]) == (2, 1, True)
    (parts / f"{case_ids[1]}.npz").unlink()  # a case without its probabilities is not finished
    outcome = _predict(model, images, parts, *options, "--continue_prediction")
    assert f"Predicted 1 case(s) as task {TASK!r}" in outcome.stdout and f"{CASES - 1} already there" in outcome.stdout
    assert outputs(parts) == outputs(one)


def test_probabilities_ensemble_and_evaluate_with_nnunets_commands(model: Path, images: Path, source: Path,
                                                                  case_ids: list[str], tmp_path: Path) -> None:
    """nnU-Net's functions behind the two commands, in this process (each runs its one worker process)."""
    from nnunetv2.ensembling.ensemble import ensemble_folders

    from nnunet_ext import compat

    folds = [tmp_path / f"fold_{fold}" for fold in (0, 1)]
    for fold, folder in enumerate(folds):
        _predict(model, images, folder, "-f", str(fold), "--disable_tta", "--save_probabilities")
    ensemble = tmp_path / "ensemble"
    # what nnUNetv2_ensemble -i FOLD0 FOLD1 -o ENSEMBLE runs: dataset.json and plans.json from the first folder
    ensemble_folders([str(folds[0]), str(folds[1])], str(ensemble), num_processes=1)
    differs = False
    for case in case_ids:
        probabilities = [np.load(folder / f"{case}.npz")["probabilities"] for folder in folds]
        for folder, p in zip(folds, probabilities):  # channel i is the task's label value i
            assert np.array_equal(p.argmax(0), _read(folder / f"{case}.nii.gz")), (folder.name, case)
        expected = ((probabilities[0] + probabilities[1]) / 2).argmax(0)
        assert np.array_equal(_read(ensemble / f"{case}.nii.gz"), expected), case
        differs |= not np.array_equal(expected, _read(folds[0] / f"{case}.nii.gz"))
    assert differs  # the two folds' random weights disagree somewhere: the average decided
    labels = tmp_path / "labels"
    labels.mkdir()
    for case in case_ids:
        shutil.copy(source / "labelsTr" / f"{case}.nii.gz", labels)
    out = folds[0]  # what nnUNetv2_evaluate_folder GT OUT -djfile OUT/dataset.json -pfile OUT/plans.json runs
    summary = compat.evaluate_folder(labels, out, out / "dataset.json", out / "plans.json", out / "summary.json")
    assert sorted(summary["mean"]) == ["1", "2", "3"]  # the task's own labels: liver, spleen, lesion
    assert len(summary["metric_per_case"]) == CASES


def test_all_tasks_with_the_new_options_equal_per_task_runs(universal_root, model: Path, tmp_path: Path) -> None:
    merged_images = tmp_path / "images"  # 4 channels: every task's input
    merged_images.mkdir()
    for image in sorted((universal_root.dataset_raw / "imagesTr").glob("*.nii.gz"))[:3 * 4]:
        shutil.copy(image, merged_images / image.name)
    options = ["-f", "1", "--disable_tta", "--save_probabilities", "-num_parts", "2", "-part_id", "1"]
    every = tmp_path / "all"
    _predict(model, merged_images, every, *options, "--combine", task="all")
    names = TaskMap.from_dataset_json(model / "dataset.json").names
    assert sorted(p.name for p in every.iterdir()) == sorted([*names, "combined"])
    for name in names:
        single = tmp_path / name
        _predict(model, merged_images, single, *options, task=name)
        assert outputs(every / name) == outputs(single), name
        assert len([f for f in outputs(single) if f.endswith(".npz")]) == 1  # part 1 of 2 of two cases
