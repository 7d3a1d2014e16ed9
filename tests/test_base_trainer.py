"""The base trainer: short-run variables and method state that survives checkpoint/resume."""
from __future__ import annotations

import json

import pytest
import torch

from nnunet_ext import compat
from nnunet_ext.errors import UserFacingError
from nnunet_ext.testing.harness import run_stock
from nnunet_ext.trainers.base import METHOD_STATE_KEY, NNUNET_GRAD_CLIP, nnUNetExtTrainer, short_run_overrides


def test_short_run_overrides_read_the_three_variables():
    env = {"NNUNET_EXT_NUM_EPOCHS": "3", "NNUNET_EXT_ITERS_PER_EPOCH": " 7 ", "NNUNET_EXT_VAL_ITERS": "1"}
    assert short_run_overrides(env) == {"num_epochs": 3, "num_iterations_per_epoch": 7,
                                        "num_val_iterations_per_epoch": 1}
    assert short_run_overrides({}) == {}
    assert short_run_overrides({"NNUNET_EXT_NUM_EPOCHS": ""}) == {}


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "ten", "$(id)", "1\n2", "1e3"])
def test_bad_short_run_value_is_a_user_facing_error_naming_the_variable_and_the_fix(bad):
    """UserFacingError: one line under nnUNetv2_train (tests/test_checkpoint_safety.py runs it)."""
    with pytest.raises(UserFacingError, match="NNUNET_EXT_ITERS_PER_EPOCH.*unset NNUNET_EXT_ITERS_PER_EPOCH"):
        short_run_overrides({"NNUNET_EXT_ITERS_PER_EPOCH": bad})


class _TrainerWithState(nnUNetExtTrainer):
    """A method-like trainer whose state must come back after resume (as a ramp-up step would)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ramp_step = 0
        self.task_map = {}

    def method_state(self) -> dict:
        return {"ramp_step": self.ramp_step, "task_map": dict(self.task_map)}

    def load_method_state(self, state: dict) -> None:
        self.ramp_step = state["ramp_step"]
        self.task_map = dict(state["task_map"])


def _bare_trainer(monkeypatch, grad_clip):
    """An nnUNetExtTrainer without a dataset: a linear 'network', an MSE 'loss', plain SGD."""
    monkeypatch.setattr(compat.base_trainer_class(), "__init__", lambda self, *args, **kwargs: None)
    trainer = nnUNetExtTrainer({}, "3d_fullres", 0, {}, torch.device("cpu"))
    trainer.device, trainer.grad_scaler, trainer.grad_clip = torch.device("cpu"), None, grad_clip
    trainer.network = torch.nn.Linear(2, 1)
    trainer.loss = lambda output, target: 1000 * ((output - target) ** 2).mean()
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.0)
    return trainer


def test_grad_clip_12_runs_nnunets_own_step(monkeypatch):
    calls = []
    monkeypatch.setattr(compat.base_trainer_class(), "train_step", lambda self, batch: calls.append(batch) or {})
    trainer = _bare_trainer(monkeypatch, NNUNET_GRAD_CLIP)
    batch = {"data": torch.ones(1, 2), "target": torch.zeros(1, 1)}
    trainer.train_step(batch)
    assert calls == [batch]


@pytest.mark.parametrize("grad_clip", [0.1, None])
def test_other_grad_clip_values_clip_at_that_norm_or_not_at_all(monkeypatch, grad_clip):
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda parameters, max_norm, *a, **k:
                        clipped.append(max_norm) or clip(parameters, max_norm, *a, **k))
    trainer = _bare_trainer(monkeypatch, grad_clip)
    result = trainer.train_step({"data": torch.ones(1, 2), "target": torch.full((1, 1), 50.0)})
    norm = torch.cat([p.grad.flatten() for p in trainer.network.parameters()]).norm().item()
    assert result["loss"] > 0
    if grad_clip is None:
        assert clipped == [] and norm > 12
    else:
        assert clipped == [grad_clip] and norm == pytest.approx(grad_clip, rel=1e-4)


def _make_trainer(root, cls, monkeypatch):
    for name, value in root.env().items():
        if name.startswith("nnUNet") or name.startswith("NNUNET_EXT"):
            monkeypatch.setenv(name, value)
    folder = root.preprocessed / root.dataset_name
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return compat.instantiate_trainer(cls, plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def test_short_run_variables_reach_the_trainer_and_its_lr_schedule(nnunet_root, monkeypatch):
    trainer = _make_trainer(nnunet_root, nnUNetExtTrainer, monkeypatch)
    monkeypatch.setenv("NNUNET_EXT_NUM_EPOCHS", "4")
    monkeypatch.setenv("NNUNET_EXT_ITERS_PER_EPOCH", "3")
    monkeypatch.delenv("NNUNET_EXT_VAL_ITERS")
    assert trainer.num_epochs == 1000  # nnU-Net's default until initialize
    trainer.initialize()
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (4, 3, 50)
    assert trainer.lr_scheduler.max_steps == 4


def test_method_state_is_saved_in_the_checkpoint_and_restored(nnunet_root, monkeypatch, tmp_path):
    trainer = _make_trainer(nnunet_root, _TrainerWithState, monkeypatch)
    trainer.initialize()
    trainer.ramp_step, trainer.task_map = 1234, {"liver": 1, "kidney": 2}
    path = tmp_path / "checkpoint.pth"
    trainer.save_checkpoint(str(path))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved[METHOD_STATE_KEY] == {"ramp_step": 1234, "task_map": {"liver": 1, "kidney": 2}}
    assert saved["trainer_name"] == "_TrainerWithState"  # nnU-Net's own keys untouched

    resumed = _make_trainer(nnunet_root, _TrainerWithState, monkeypatch)
    resumed.load_checkpoint(str(path))
    assert (resumed.ramp_step, resumed.task_map) == (1234, {"liver": 1, "kidney": 2})
    for a, b in zip(trainer.network.state_dict().values(), resumed.network.state_dict().values()):
        assert torch.equal(a, b)


def test_trainer_without_method_state_writes_nnunet_checkpoints_unchanged(nnunet_root, monkeypatch, tmp_path):
    trainer = _make_trainer(nnunet_root, nnUNetExtTrainer, monkeypatch)
    trainer.initialize()
    trainer.save_checkpoint(str(tmp_path / "c.pth"))
    assert METHOD_STATE_KEY not in torch.load(tmp_path / "c.pth", map_location="cpu", weights_only=False)


@pytest.mark.slow  # ~2 min; stock --c with method state is also checked by test_two_stream_loader's default test
def test_stock_train_continue_flag_resumes_where_it_stopped(nnunet_root):
    """nnUNetv2_train --c: a 1-epoch run, then continue to 2 epochs from checkpoint_latest."""
    common = ["nnUNetv2_train", nnunet_root.dataset_id, "3d_fullres", 1, "-tr", "nnUNetExtTrainer", "-device", "cpu"]
    fold = nnunet_root.results / nnunet_root.dataset_name / "nnUNetExtTrainer__nnUNetPlans__3d_fullres" / "fold_1"
    run_stock(common, nnunet_root.env(epochs=1))
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 1
    # nnU-Net continues from checkpoint_final when it is the newest; ask for one more epoch
    second = run_stock(common + ["--c"], nnunet_root.env(epochs=2))
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    assert len(final["logging"]["train_losses"]) == 2, "the resumed run should append to the first run's log"
    assert "num_epochs = 2" in second.stdout


# --- the data seam: one get_dataloaders, configured by hooks ----------------------------------------

class _SeamTrainer(nnUNetExtTrainer):
    """Overrides a data hook without changing it, so the base's own get_dataloaders runs instead of nnU-Net's."""

    def training_batches(self, dataset, transforms, initial_patch_size, num_processes):
        return super().training_batches(dataset, transforms, initial_patch_size, num_processes)


def _first_batches(trainer) -> list[dict]:
    import random

    import numpy as np

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    train, validation = trainer.get_dataloaders()  # draws one batch of each, as nnU-Net's
    return [next(train), next(train), next(validation)]


def test_the_data_seam_with_default_hooks_gives_nnunets_own_batches(nnunet_root, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # in-process augmentation: the seeds decide every batch
    ours = _make_trainer(nnunet_root, _SeamTrainer, monkeypatch)
    nnunet = _make_trainer(nnunet_root, nnUNetExtTrainer, monkeypatch)
    assert ours.configures_data() and not nnunet.configures_data()
    for trainer in (ours, nnunet):
        trainer.initialize()
    for a, b in zip(_first_batches(ours), _first_batches(nnunet)):
        assert list(a["keys"]) == list(b["keys"])
        assert torch.equal(a["data"], b["data"])
        assert all(torch.equal(x, y) for x, y in zip(a["target"], b["target"]))  # deep-supervision list


def test_methods_configure_the_seam_instead_of_overriding_get_dataloaders():
    from nnunet_ext.registry import import_object, trainer_paths
    from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer

    classes = [import_object(path) for path in trainer_paths().values()] + [nnUNetSemiSupervisedTrainer]
    assert all(cls.get_dataloaders is nnUNetExtTrainer.get_dataloaders for cls in classes)
    configured = {cls.__name__ for cls in classes if nnUNetExtTrainer.configures_data(object.__new__(cls))}
    assert configured == {"nnUNetUniversalTrainer", "UniSegTrainer", "DoDNetTrainer", "TransDoDNetTrainer",
                          "nnUNetSemiSupervisedTrainer", "MCNetPlusTrainer", "LeFeDTrainer", "ClassSAMTrainer"}


# --- region-based datasets: one refusal ---------------------------------------------------------------

class _Labels:
    def __init__(self, has_regions: bool):
        self.has_regions = has_regions


@pytest.mark.parametrize("module, name", [("mcnet", "MCNetPlusTrainer"), ("lefed", "LeFeDTrainer")])
def test_region_based_datasets_are_refused_in_one_line_naming_the_trainer(module, name):
    import importlib

    cls = getattr(importlib.import_module(f"nnunet_ext.trainers.{module}"), name)
    trainer = object.__new__(cls)
    trainer.label_manager = _Labels(True)
    with pytest.raises(UserFacingError, match=rf"^{name} does not support region-based datasets \(dataset.json "
                                              rf"'regions'\): .*softmax-based\. Train it on a dataset with plain "
                                              rf"labels") as raised:
        trainer.initialize()
    assert "\n" not in str(raised.value)
    trainer.label_manager = _Labels(False)
    trainer.refuse_regions("unused")  # plain labels pass


def test_the_region_refusal_is_written_once():
    """Trainer modules ask ``refuse_regions``; only the base (and BA-Net, which trains on regions) read
    ``has_regions``."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "trainers"
    readers = sorted(p.name for p in folder.glob("*.py") if "has_regions" in p.read_text())
    assert readers == ["banet.py", "base.py"]
    callers = sorted(p.name for p in folder.glob("*.py") if "self.refuse_regions(" in p.read_text())
    assert callers == ["class_sam.py", "lefed.py", "mcnet.py", "universal.py"]
