"""Universal (multi-dataset) training: task-aware loader, partial-label loss, task conditioning,
per-task validation, task-aware predict; end to end through the stock commands."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunet_ext import compat
from nnunet_ext.datasets.multi_dataset import DEFAULT_DATASET_IDS, DEFAULT_SOURCES
from nnunet_ext.losses.partial_label import PartialLabelLoss
from nnunet_ext.tasks.conditioning import TaskNotSetError, is_masked
from nnunet_ext.tasks.sampling import task_probabilities
from nnunet_ext.tasks.task_map import TaskMap, TaskMapError
from nnunet_ext.testing.harness import UNIVERSAL_DATASET_ID as MERGED_ID
from nnunet_ext.testing.harness import NnUNetRoot, load_trainer, predict_task_and_check, run_stock
from nnunet_ext.trainers.universal import (TASKS_PLANS_KEY, TaskConditionedNetwork, nnUNetUniversalTrainer,
                                           summarise)

TRAINER = "nnUNetUniversalTrainer"


# ---------------------------------------------------------------------------------------------
# partial-label loss and conditioning (no data)
# ---------------------------------------------------------------------------------------------
def test_partial_label_loss_gives_unannotated_classes_zero_gradient():
    """Task 0 annotates classes {0, 1, 3} of 4; class 2 is drawn in the image but labelled 0."""
    annotated = [[True, True, False, True], [True, False, True, False]]
    loss = PartialLabelLoss(compat.dice_ce_loss(batch_dice=True, ignore_label=4), annotated, None, 4)
    logits = torch.randn(2, 4, 6, 8, 8, requires_grad=True)
    target = torch.zeros(2, 1, 6, 8, 8, dtype=torch.int16)
    target[:, :, 1:3] = 1
    target[:, :, 4:] = 3
    loss.set_task(0)
    value = loss(logits, target)
    value.backward()
    assert torch.all(logits.grad[:, 2] == 0), "an unannotated class got gradient"
    assert torch.all(logits.grad[:, [0, 1, 3]].abs().sum(dim=(0, 2, 3, 4)) > 0)
    # same value as nnU-Net's loss on the task's channels with the target re-indexed (3 -> 2)
    reference = compat.dice_ce_loss(batch_dice=True)(logits.detach()[:, [0, 1, 3]],
                                                      torch.where(target == 3, 2, target))
    assert torch.isclose(value.detach(), reference, atol=1e-6)
    # another task uses other channels
    logits.grad = None
    loss.set_task(1)
    loss(logits, torch.zeros_like(target)).backward()
    assert torch.all(logits.grad[:, [1, 3]] == 0)


def test_partial_label_loss_skips_the_ignore_label():
    annotated = [[True, True, True]]
    loss = PartialLabelLoss(compat.dice_ce_loss(batch_dice=False, ignore_label=3), annotated, ignore_value=3,
                            ignore_index=3)
    logits = torch.randn(1, 3, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (1, 1, 4, 8, 8), dtype=torch.int16)
    target[..., :4] = 3  # ignored half
    loss(logits, target).backward()
    assert torch.all(logits.grad[..., :4] == 0) and logits.grad[..., 4:].abs().sum() > 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.deep_supervision = True
        self.conv = nn.Conv3d(1, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return [y, y[:, :, ::2, ::2, ::2]] if self.decoder.deep_supervision else y


def test_task_conditioned_network_masks_unannotated_classes_in_eval_only():
    network = TaskConditionedNetwork(_Net(), 2, [[True, True, False, True], [True, False, True, False]], 4)
    x = torch.randn(1, 1, 4, 8, 8)
    with pytest.raises(TaskNotSetError, match="nnunet-ext predict --task NAME"):
        network(x)
    network.set_task(1)
    keep = torch.tensor([True, False, True, False])
    train_outputs = network(x)
    assert not is_masked(train_outputs[0], keep).any()
    network.eval()
    network.decoder.deep_supervision = False  # nnU-Net's inference toggle reaches the inner decoder
    out = network(x)
    assert isinstance(out, torch.Tensor)
    masked = is_masked(out, keep)
    assert masked[:, [1, 3]].all() and not masked[:, [0, 2]].any()
    assert torch.isfinite(out.half()).all()  # stays on the scale of real logits (nnU-Net sums tiles in fp16)
    assert out.argmax(1).unique().tolist() in ([0], [2], [0, 2])
    with pytest.raises(ValueError, match="out of range"):
        network.set_task(2)
    assert "task_index" not in network.state_dict()


def test_task_probabilities_by_cases_uniform_or_given():
    task_map = TaskMap.from_dict({
        name: {"task_id": i, "source": f"Dataset00{i}_{name}", "case_prefix": f"T0{i}{name}_", "num_channels": 1,
               "channel_names": {"0": "CT"}, "labels": {"background": 0, name.lower(): i + 1},
               "to_source": {"0": 0, str(i + 1): 1}, "source_labels": {"background": 0, name.lower(): 1}}
        for i, name in enumerate(["A", "B", "C"])})
    counts = {0: 6, 1: 2, 2: 0}
    assert task_probabilities(task_map, counts) == {0: 0.75, 1: 0.25}
    assert task_probabilities(task_map, counts, "uniform") == {0: 0.5, 1: 0.5}
    assert task_probabilities(task_map, counts, {"A": 1, "B": 3}) == {0: 0.25, 1: 0.75}
    with pytest.raises(TaskMapError, match="unknown tasks"):
        task_probabilities(task_map, counts, {"Z": 1})
    with pytest.raises(ValueError, match="not one of"):
        task_probabilities(task_map, counts, "proportional")


def test_summary_means_each_label_over_the_cases_that_annotate_it():
    cases = [{"metrics": {1: {"Dice": 0.8}}}, {"metrics": {1: {"Dice": 0.6}, 2: {"Dice": 0.4}}}]
    summary = summarise(cases)
    assert summary["mean"] == {"1": {"Dice": pytest.approx(0.7)}, "2": {"Dice": pytest.approx(0.4)}}
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------
# merged synthetic family: loader, trainer, end to end
# ---------------------------------------------------------------------------------------------
def _trainer(root: NnUNetRoot, monkeypatch, results: Path) -> nnUNetUniversalTrainer:
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return load_trainer(root, nnUNetUniversalTrainer, monkeypatch, results)

def test_loader_yields_single_task_batches_with_the_tasks_labels(universal_root, tmp_path, monkeypatch):
    trainer = _trainer(universal_root, monkeypatch, tmp_path)
    trainer.initialize()
    train, validation = trainer.get_dataloaders()
    task_map = trainer.task_map
    seen = Counter()
    for _ in range(12):
        batch = next(train)
        task = batch["task_id"]
        seen[task] += 1
        assert {task_map.task_of_case(k).task_id for k in batch["keys"]} == {task}
        values = set(torch.unique(batch["target"][0]).tolist())
        assert values <= {0, *task_map.task(task).annotated_values}, (task, values)
        assert isinstance(batch["target"], list)  # nnU-Net's deep-supervision targets, augmentation ran
    assert len(seen) >= 2, seen
    for _ in range(6):  # validation (no intensity augmentation): a task's zero-padded channels stay zero
        batch = next(validation)
        task = task_map.task(batch["task_id"])
        padded = batch["data"][:, task.num_channels:]
        assert padded.numel() == 0 or float(padded.abs().max()) < 1e-6, task.name
    plans = trainer.plans_manager.plans[TASKS_PLANS_KEY]
    assert TaskMap.from_dict(plans) == task_map


def test_trainer_refuses_a_dataset_without_tasks(nnunet_root, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = json.loads((nnunet_root.preprocessed / nnunet_root.dataset_name / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((nnunet_root.preprocessed / nnunet_root.dataset_name / "dataset.json").read_text())
    with pytest.raises(TaskMapError, match="nnunet-ext merge"):
        compat.instantiate_trainer(nnUNetUniversalTrainer, plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def test_checkpoint_from_another_task_map_is_refused(universal_root, tmp_path, monkeypatch):
    trainer = _trainer(universal_root, monkeypatch, tmp_path)
    state = trainer.method_state()
    trainer.load_method_state(state)  # same map: fine
    other = dict(state["task_map"])
    other.pop(next(iter(other)))
    for position, name in enumerate(other):
        other[name] = {**other[name], "task_id": position}
    with pytest.raises(TaskMapError, match="another task map"):
        trainer.load_method_state({"task_map": other})


@pytest.fixture(scope="module")
def trained(universal_root):
    env = universal_root.env(epochs=1, iterations=2)
    result = run_stock(["nnUNetv2_train", MERGED_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu"], env)
    folder = universal_root.results / universal_root.dataset_name / f"{TRAINER}__nnUNetPlans__3d_fullres"
    return folder, result.stdout + result.stderr


def test_training_saves_the_task_map_and_validates_per_task(universal_root, trained):
    folder, output = trained
    task_map = TaskMap.from_dataset_json(universal_root.dataset_raw / "dataset.json")
    plans = json.loads((folder / "plans.json").read_text())
    assert TaskMap.from_dict(plans[TASKS_PLANS_KEY]) == task_map
    checkpoint = compat.read_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert TaskMap.from_dict(checkpoint["nnunet_ext_state"]["task_map"]) == task_map
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "Pseudo dice per task:" in log
    per_task = json.loads((folder / "fold_0" / "validation" / "summary_per_task.json").read_text())
    summary = json.loads((folder / "fold_0" / "validation" / "summary.json").read_text())
    assert set(per_task) <= set(task_map.names) and per_task
    for case in summary["metric_per_case"]:  # every case scored on its own task's labels only
        task = task_map.task(case["task"])
        assert {int(k) for k in case["metrics"]} == set(task.annotated_values)


def test_stock_predict_without_a_task_points_to_ours(universal_root, trained, tmp_path):
    env = universal_root.env()
    command = ["nnUNetv2_predict", "-i", universal_root.dataset_raw / "imagesTs", "-o", tmp_path / "out",
               "-d", MERGED_ID, "-c", "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", "cpu", "-npp", 0, "-nps", 0]
    with pytest.raises(AssertionError, match="nnunet-ext predict --task"):
        run_stock(command, env)


@pytest.mark.parametrize("source_index", [pytest.param(0, marks=pytest.mark.slow), 2], ids=["1_channel", "4_channels"])
def test_task_aware_predict_writes_the_tasks_own_labels(universal_root, trained, tmp_path, source_index):
    folder, _ = trained
    output = tmp_path / "pred"
    source_folder = predict_task_and_check(universal_root, TRAINER, source_index, output, default_inference=True)
    source_json = json.loads((source_folder / "dataset.json").read_text())
    written = json.loads((output / "dataset.json").read_text())
    assert written["labels"] == source_json["labels"]
    run_stock(["nnUNetv2_evaluate_folder", source_folder / "labelsTs", output, "-djfile", output / "dataset.json",
               "-pfile", folder / "plans.json", "-np", 1], universal_root.env())
    assert (output / "summary.json").is_file()
    assert sorted(p.name for p in (source_folder / "imagesTs").iterdir())  # inputs untouched


def test_task_aware_predict_rejects_wrong_channel_counts(universal_root, trained, tmp_path):
    source_folder = next(universal_root.raw.glob(f"Dataset{DEFAULT_DATASET_IDS[1]:03d}_*"))  # 2 channels
    import subprocess

    completed = subprocess.run(["nnunet-ext", "predict", "--task", DEFAULT_SOURCES[0].name,  # 1-channel task
                                "-i", str(source_folder / "imagesTs"), "-o", str(tmp_path / "o"), "-d", str(MERGED_ID),
                                "-f", "0", "-tr", TRAINER, "-device", "cpu"],
                               env=universal_root.env(), capture_output=True, text=True)
    assert completed.returncode == 2, completed.stderr
    assert "needs 1 (or 4, already padded) channels" in completed.stderr
