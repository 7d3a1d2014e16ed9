"""Shared set-up of the unlabelled-data tests: one nnU-Net root with imagesUnlabeled, made once per session.

Used by test_unlabeled_preprocess.py, test_label_budget.py and test_two_stream_loader.py (imported
as a plain module; a cache makes the three files share one root, so planning and preprocessing
run once).

The results folder is shared too, and a fold trained with a label budget refuses another budget
(by design), so the folds are split between the files: test_label_budget uses folds 1-3,
test_two_stream_loader folds 4 (budget 2, in-process) and 0 (budget 2, stock CLI).

``tiny_semi_root`` is a smaller, two-channel root for test_hostile_unlabeled.py, planned and
preprocessed in-process (nnU-Net's own planner and preprocessor); its imagesUnlabeled is not
preprocessed, so each test decides what to do with it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from planned_roots import nnunet_environment, plan_in_process, shared_root

from nnunet_ext import compat
from nnunet_ext.datasets.synthetic import SyntheticSpec
from nnunet_ext.datasets.unlabeled import write_unlabeled_images
from nnunet_ext.testing.harness import HARNESS_SPEC, NnUNetRoot, make_nnunet_root
from nnunet_ext.unlabeled.preprocess import preprocess_unlabeled

SEMI_DATASET_ID = 993
SEMI_DATASET_NAME = "HarnessSemi"
NUM_GENERATED_UNLABELED = 3
COPIED_CASE = "synth_000"  # a labelled training image, also put into imagesUnlabeled under another name
COPY_NAME = "copy_of_synth_000"
TRAINER = "SemiSupervisedTestTrainer"
TRAINER_FOLDER = str(Path(__file__).parent / "semi_trainers")
_ROOTS: dict[str, NnUNetRoot] = {}


def semi_root(tmp_path_factory) -> NnUNetRoot:
    """Harness dataset + 3 generated unlabelled images + a copy of synth_000; planned and preprocessed by
    nnU-Net's functions in-process, unlabelled images too (the CLI itself is tested separately).
    One root per worker (the files above share it), copied from the one built for the whole run."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _ROOTS:
        _ROOTS[key] = shared_root(tmp_path_factory, "semi_root", _build_semi_root)
    return _ROOTS[key]


def _build_semi_root(folder: Path) -> NnUNetRoot:
    root = make_nnunet_root(folder, SEMI_DATASET_ID, SEMI_DATASET_NAME)
    images = write_unlabeled_images(root.raw, SEMI_DATASET_ID, SEMI_DATASET_NAME, HARNESS_SPEC,
                                    NUM_GENERATED_UNLABELED)
    for channel in range(HARNESS_SPEC.num_channels):
        shutil.copyfile(root.dataset_raw / "imagesTr" / f"{COPIED_CASE}_{channel:04d}.nii.gz",
                        images / f"{COPY_NAME}_{channel:04d}.nii.gz")
    plan_in_process(root)
    with nnunet_environment(root):
        preprocess_unlabeled(SEMI_DATASET_ID, ["3d_fullres"], num_processes=1)
    return root


TINY_DATASET_ID = 982
TINY_DATASET_NAME = "HostileTiny"
TINY_SPEC = SyntheticSpec(num_training=2, num_test=0, shape=(16, 16, 16), spacing=(2.0, 1.0, 1.0), num_channels=2)
TINY_UNLABELED = ("synth_u000", "synth_u001")


def tiny_semi_root(tmp_path_factory) -> NnUNetRoot:
    """Two labelled 16^3 two-channel cases + two unlabelled ones, planned and preprocessed (3d_fullres)
    in-process; imagesUnlabeled is left unpreprocessed. A private copy of the run's one build."""
    return shared_root(tmp_path_factory, "tiny_semi_root", _build_tiny_semi_root)


def _build_tiny_semi_root(folder: Path) -> NnUNetRoot:
    root = make_nnunet_root(folder, TINY_DATASET_ID, TINY_DATASET_NAME, TINY_SPEC)
    write_unlabeled_images(root.raw, TINY_DATASET_ID, TINY_DATASET_NAME, TINY_SPEC, len(TINY_UNLABELED))
    plan_in_process(root, check_integrity=False)
    return root


def unlabeled_cases() -> set[str]:
    return {f"synth_u{i:03d}" for i in range(NUM_GENERATED_UNLABELED)} | {COPY_NAME}


def make_trainer(root: NnUNetRoot, cls, fold: int = 0, continue_training: bool = False):
    """A trainer as nnUNetv2_train creates it, on the CPU (call inside ``nnunet_environment``)."""
    folder = root.preprocessed / root.dataset_name
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return compat.instantiate_trainer(cls, plans, "3d_fullres", fold, dataset_json, torch.device("cpu"),
                                      continue_training=continue_training)


def import_test_trainer():
    """The class in tests/semi_trainers (the same file nnU-Net's lookup finds in the CLI tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("semi_test_trainer", Path(TRAINER_FOLDER) / "semi_test_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SemiSupervisedTestTrainer
