"""The two-stream loader, the semi-supervised base trainer, and their end-to-end run through the stock CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nnunet_ext import compat
from nnunet_ext.testing.harness import run_stock, stock_command
from nnunet_ext.trainers.base import METHOD_STATE_KEY
from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer, sigmoid_rampup
from nnunet_ext.unlabeled.budget import BUDGET_FILE, BUDGET_VARIABLE
from nnunet_ext.unlabeled.convention import UnlabeledDataError, manifest_path
from nnunet_ext.unlabeled.loader import (TwoStreamBatches, labeled_part, per_process_batch_size, split_processes,
                                         unlabeled_part)
from semi_support import (SEMI_DATASET_ID, TRAINER, TRAINER_FOLDER, import_test_trainer, make_trainer,
                          nnunet_environment, semi_root, unlabeled_cases)


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
def test_per_process_batch_split_is_explicit():
    assert per_process_batch_size(2, 1, 0) == 2
    assert [per_process_batch_size(2, 2, r) for r in range(2)] == [1, 1]
    assert [per_process_batch_size(5, 2, r) for r in range(2)] == [3, 2]
    assert per_process_batch_size(0, 4, 3) == 0
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        per_process_batch_size(2, 4, 0)


def test_augmentation_workers_are_shared_by_batch_size():
    assert split_processes(0, 2, 2) == (0, 0)
    assert split_processes(1, 2, 2) == (1, 1)
    assert split_processes(12, 2, 2) == (6, 6)
    assert split_processes(12, 1, 3) == (3, 9)
    assert split_processes(4, 2, 0) == (4, 0)


def test_parts_of_nested_outputs():
    outputs = [torch.arange(5), (torch.arange(5) * 2, torch.arange(5) * 3)]
    assert labeled_part(outputs, 2)[0].tolist() == [0, 1]
    assert unlabeled_part(outputs, 2)[1][1].tolist() == [6, 9, 12]
    assert isinstance(labeled_part(outputs, 2)[1], tuple)


def test_two_stream_batches_concatenate_labelled_first():
    labeled = iter([{"data": torch.zeros(2, 1, 4), "target": [torch.ones(2, 1, 4)], "keys": ["a", "b"]}])
    unlabeled = iter([{"data": torch.ones(3, 1, 4), "keys": ["u", "v", "w"]}])
    batch = next(TwoStreamBatches(labeled, unlabeled, 2, 3))
    assert batch["data"].shape[0] == 5 and batch["labeled_count"] == 2
    assert batch["data"][:2].eq(0).all() and batch["data"][2:].eq(1).all()
    assert batch["target"][0].shape[0] == 2 and batch["unlabeled_keys"] == ["u", "v", "w"]
    only = next(TwoStreamBatches(iter([{"data": torch.zeros(2, 1), "target": torch.ones(2, 1), "keys": ["a", "b"]}]),
                                 None, 2, 0))
    assert only["data"].shape[0] == 2 and only["unlabeled_keys"] == []


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 40) == pytest.approx(0.006737947)  # exp(-5)
    assert sigmoid_rampup(40, 40) == 1.0 and sigmoid_rampup(400, 40) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    assert sigmoid_rampup(10, 40) < sigmoid_rampup(20, 40)


def test_base_keeps_nnunets_constructor_signature():
    import inspect

    def shape(cls):  # names, kinds and defaults (annotations are strings under postponed evaluation)
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert shape(nnUNetSemiSupervisedTrainer) == shape(compat.base_trainer_class())


# ---------------------------------------------------------------------------------------------
# the trainer's loaders on a real preprocessed dataset
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return semi_root(tmp_path_factory)


class _Recording:
    """Wraps nnU-Net's composed training transforms; records input/output spatial shapes per sample."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def __call__(self, **data):
        before = tuple(data["image"].shape[1:])
        out = self.inner(**data)
        self.calls.append((before, tuple(out["image"].shape[1:])))
        return out


def spy_trainer_class():
    base = import_test_trainer()

    class SpyTrainer(base):
        calls: list = []

        def get_training_transforms(self, *args, **kwargs):
            return _Recording(super().get_training_transforms(*args, **kwargs), SpyTrainer.calls)

    return SpyTrainer


def test_batches_mix_labelled_and_unlabelled_patches_both_augmented(root):
    cls = spy_trainer_class()
    with nnunet_environment(root, nnUNet_n_proc_DA="0", **{BUDGET_VARIABLE: "2"}):
        trainer = make_trainer(root, cls, fold=4)
        trainer.initialize()
        assert (trainer.labeled_batch_size, trainer.unlabeled_batch_size, trainer.batch_size) == (2, 2, 2)
        train, validation = trainer.get_dataloaders()
        training, val_keys = trainer.do_split()
        pool = unlabeled_cases() | set(trainer.unlabeled_training_keys)
        assert len(training) == 2 and trainer.unlabeled_training_keys
        cls.calls.clear()
        seen_unlabeled = set()
        for _ in range(3):
            batch = next(train)
            assert batch["data"].shape[0] == 4 and batch["labeled_count"] == 2
            assert isinstance(batch["target"], list) and all(t.shape[0] == 2 for t in batch["target"])
            assert set(batch["keys"]) <= set(training), "labelled patches only from the budget's labelled cases"
            assert set(batch["unlabeled_keys"]) <= pool, "unlabelled patches only from the unlabelled pool"
            assert not set(batch["unlabeled_keys"]) & (set(training) | set(val_keys))
            seen_unlabeled |= set(batch["unlabeled_keys"])
            assert list(batch["data"].shape[2:]) == list(trainer.configuration_manager.patch_size)
        # nnU-Net's transforms ran once per patch of both streams (3 batches x (2 + 2)), cropping the
        # larger rotation-safe patch to the final one: the spatial augmentation was applied to both
        initial = tuple(trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2])
        assert len(cls.calls) == 12
        assert all(before == initial and after == tuple(trainer.configuration_manager.patch_size)
                   for before, after in cls.calls)
        assert initial != tuple(trainer.configuration_manager.patch_size)
        assert seen_unlabeled, "no unlabelled case drawn"
        val = next(validation)
        assert val["data"].shape[0] == 2 and set(map(str, val["keys"])) <= set(val_keys)

        data = next(train)
        trainer.train_step(data)
        assert trainer.training_iteration == 1
        assert trainer.method_state()["training_iteration"] == 1


def test_multiprocess_augmenters_work_and_stop(root):
    with nnunet_environment(root, nnUNet_n_proc_DA="2", **{BUDGET_VARIABLE: "2"}):  # fold 4 as above
        trainer = make_trainer(root, import_test_trainer(), fold=4)
        trainer.initialize()
        train, validation = trainer.get_dataloaders()
        try:
            batch = next(train)
            assert batch["data"].shape[0] == 4 and batch["labeled_count"] == 2
            assert set(batch["unlabeled_keys"]) <= unlabeled_cases() | set(trainer.unlabeled_training_keys)
        finally:
            train._finish()
            compat.finish_augmenter(validation)


def test_missing_or_stale_unlabelled_data_is_reported(root, tmp_path, monkeypatch):
    cls = import_test_trainer()
    with nnunet_environment(root, nnUNet_n_proc_DA="0") as patch:
        trainer = make_trainer(root, cls, fold=0)
        real = trainer.unlabeled_folder()
        empty = tmp_path / "nothing_unlabeled"
        monkeypatch.setattr(trainer, "unlabeled_folder", lambda: empty)
        patch.setenv("nnUNet_raw", str(tmp_path / "raw"))
        with pytest.raises(UnlabeledDataError, match=r"needs unlabelled images.*nnunet-ext preprocess-unlabeled -d "
                                                     r"Dataset993_HarnessSemi -c 3d_fullres.*NNUNET_EXT_LABEL_BUDGET"):
            trainer.get_unlabeled_dataset()

        manifest = json.loads(manifest_path(real).read_text())
        manifest_path(empty).write_text(json.dumps(dict(manifest, stamp="other-plans")))
        with pytest.raises(UnlabeledDataError, match="preprocessed with other plans"):
            trainer.get_unlabeled_dataset()

        manifest_path(empty).write_text(json.dumps(manifest))
        raw_images = tmp_path / "raw" / root.dataset_name / "imagesUnlabeled"
        raw_images.mkdir(parents=True)
        for case in manifest["cases"] + ["brand_new"]:
            (raw_images / f"{case}_0000.nii.gz").write_bytes(b"")
        with pytest.raises(UnlabeledDataError, match=r"has changed since it was preprocessed \(1 new, 0 removed\)"):
            trainer.get_unlabeled_dataset()
        shutil.rmtree(raw_images)
        manifest_path(empty).unlink()
        raw_images.mkdir()
        with pytest.raises(UnlabeledDataError, match="exists but is not preprocessed"):
            trainer.get_unlabeled_dataset()


# ---------------------------------------------------------------------------------------------
# end to end: stock nnUNetv2_train, then --c
# ---------------------------------------------------------------------------------------------
def recorded_batches(output: str) -> list[dict]:
    import ast

    return [ast.literal_eval(line.split("semi-test batch: ", 1)[1]) for line in output.splitlines()
            if "semi-test batch: " in line]


STOCK_ENV = dict(nnUNet_extTrainer=TRAINER_FOLDER, nnUNet_n_proc_DA="0", **{BUDGET_VARIABLE: "2"})
# fold 0: the only fold no other test of this root gives a label budget (they share the results folder)
STOCK_COMMAND = ["nnUNetv2_train", SEMI_DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu"]


@pytest.fixture(scope="module")
def stock_run(root) -> tuple[Path, str]:
    """One epoch of ``nnUNetv2_train`` with a label budget of 2: the fold folder and the output."""
    first = run_stock(STOCK_COMMAND, root.env(epochs=1, iterations=2, **STOCK_ENV))
    fold = root.results / root.dataset_name / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    return fold, first.stdout + first.stderr


def test_stock_train_keeps_the_budget_and_counts_the_ramp_up_step(stock_run):
    fold, output = stock_run
    assert "2 labelled + 2 unlabelled patches" in output and "is not used for training" in output
    budget = json.loads((fold / BUDGET_FILE).read_text())
    assert budget["num_labeled"] == 2
    batches = recorded_batches(output)
    assert [b["iteration"] for b in batches] == [0, 1]
    pool = unlabeled_cases() | set(budget["unlabeled"])
    for batch in batches:
        assert (batch["labeled_count"], batch["data"], batch["target"]) == (2, 4, 2)
        assert set(batch["keys"]) <= set(budget["labeled"]) and set(batch["unlabeled_keys"]) <= pool
    checkpoint = compat.read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint[METHOD_STATE_KEY]["training_iteration"] == 2
    assert (fold / "validation" / "summary.json").is_file(), "nnU-Net's validation on the labelled cases"


# ~35 s; the stock --c of a semi-supervised trainer and its training_iteration run in the default suite in
# tests/test_checkpoint_safety.py (after a crash mid-save), the budget read back at a resume in test_label_budget.py
@pytest.mark.slow
def test_stock_continue_keeps_budget_and_ramp_up_step(root, stock_run):
    fold, _ = stock_run
    budget = json.loads((fold / BUDGET_FILE).read_text())
    second = run_stock(STOCK_COMMAND + ["--c"], root.env(epochs=2, iterations=2, **STOCK_ENV))
    output = second.stdout + second.stderr
    assert "resumed at training iteration 2" in output and "read back from" in output
    assert [b["iteration"] for b in recorded_batches(output)] == [2, 3], "the ramp-up step must continue"
    checkpoint = compat.read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 2 and checkpoint[METHOD_STATE_KEY]["training_iteration"] == 4
    assert json.loads((fold / BUDGET_FILE).read_text()) == budget


# ---------------------------------------------------------------------------------------------
# the demo with a semi-supervised trainer
# ---------------------------------------------------------------------------------------------
def test_demo_recognises_semi_supervised_trainers(monkeypatch):
    from nnunet_ext.demo import trainer_uses_unlabeled_data

    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_FOLDER + os.pathsep + os.environ.get("nnUNet_extTrainer", ""))
    assert trainer_uses_unlabeled_data(TRAINER)
    assert not trainer_uses_unlabeled_data("nnUNetExtTrainer")


@pytest.mark.slow
def test_demo_with_a_semi_supervised_trainer_adds_and_preprocesses_unlabelled_images(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_EXT_"))}
    env.update(nnUNet_extTrainer=TRAINER_FOLDER, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    workdir = tmp_path / "demo"
    result = subprocess.run([stock_command("nnunet-ext"), "demo", "--trainer", TRAINER, "--epochs", "1", "--iters",
                             "2", "--workdir", str(workdir)], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert f"{TRAINER} is semi-supervised: 10 unlabelled images" in result.stdout
    assert "semi-test batch: {'labeled_count': 2, 'data': 4, 'target': 2" in result.stdout
    raw = next((workdir / "nnUNet_raw").glob("Dataset990_*"))
    assert len(list((raw / "imagesUnlabeled").glob("*.nii.gz"))) == 10
    preprocessed = next((workdir / "nnUNet_preprocessed").glob("Dataset990_*"))
    assert len(next(preprocessed.glob("*_unlabeled.json")).read_text()) > 0
    assert "Dice on the held-out test cases" in result.stdout
