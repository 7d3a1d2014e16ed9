"""UniSegTrainer: schedule, network from the merged dataset's plans, stock training, task-aware
predict, and the prompt coming back from the checkpoint."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from nnunet_ext import compat
from nnunet_ext.architectures.uniseg import UniSeg
from nnunet_ext.tasks.task_map import TaskMap
from nnunet_ext.testing.harness import NnUNetRoot, load_trainer, predict_task_and_check, train_stock
from nnunet_ext.trainers.uniseg import ITERATIONS_PER_TASK, UniSegTrainer
from nnunet_ext.trainers.universal import TASKS_PLANS_KEY

TRAINER = "UniSegTrainer"


def _trainer(root: NnUNetRoot, monkeypatch, results) -> UniSegTrainer:
    return load_trainer(root, UniSegTrainer, monkeypatch, results)

def test_schedule_is_the_official_one(universal_root, tmp_path, monkeypatch):
    trainer = _trainer(universal_root, monkeypatch, tmp_path)
    assert trainer.task_weighting == "uniform"
    assert trainer.num_iterations_per_epoch == ITERATIONS_PER_TASK * 3 and trainer.num_epochs == 1000
    trainer.network = UniSegTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 4, trainer.label_manager.num_segmentation_heads, True)
    optimizer, scheduler = trainer.configure_optimizers()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    assert type(scheduler).__name__ == "PolyLRScheduler" and scheduler.exponent == 0.9


def test_network_follows_the_merged_plans(universal_root, tmp_path, monkeypatch):
    trainer = _trainer(universal_root, monkeypatch, tmp_path)
    heads = trainer.label_manager.num_segmentation_heads
    network = UniSegTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 4,
                                                       heads, True)
    assert isinstance(network, UniSeg)
    config = trainer.configuration_manager
    patch = tuple(config.patch_size)
    strides = np.prod(np.array(config.network_arch_init_kwargs["strides"]), axis=0)
    assert tuple(network.prompt.shape) == (1, 3, *(p // s for p, s in zip(patch, strides)))
    task_map = TaskMap.from_dict(trainer.plans_manager.plans[TASKS_PLANS_KEY])
    outputs_by_task = []
    for task in task_map:
        network.set_task(task.task_id)
        outputs = network(torch.randn(1, 4, *patch))
        assert len(outputs) == len(trainer._get_deep_supervision_scales())
        assert tuple(outputs[0].shape) == (1, heads, *patch)
        outputs_by_task.append(outputs[0].detach())
    assert not torch.allclose(outputs_by_task[0], outputs_by_task[1])  # the prompt conditions the output
    loss = trainer._build_loss()
    expected = np.array([1 / 2 ** i for i in range(len(loss.weight_factors))])
    expected[-1] = 0  # nnU-Net's weights: official UniSeg [1, .5, .25, .125, 0], normalised
    assert np.allclose(loss.weight_factors, expected / expected.sum())


@pytest.fixture(scope="module")
def uniseg_model(universal_root):
    return train_stock(universal_root, TRAINER)


@pytest.mark.slow  # ~1 min; like DoDNet's and TransDoDNet's; the prediction route of a UniSeg model runs in the
# default suite on random weights (tests/test_predict_all_tasks.py), the checkpoint round trip below
def test_stock_training_and_task_aware_prediction(universal_root, uniseg_model, tmp_path):
    checkpoint = compat.read_checkpoint(uniseg_model / "fold_0" / "checkpoint_final.pth")
    assert "prompt" in checkpoint["network_weights"]
    assert "task_map" in checkpoint["nnunet_ext_state"]
    assert checkpoint["current_epoch"] == 1
    assert (uniseg_model / "fold_0" / "validation" / "summary_per_task.json").is_file()
    predict_task_and_check(universal_root, TRAINER, 1, tmp_path / "pred")  # 2 channels, liver + spleen + lesion


def test_resume_restores_the_prompt_and_task_map(universal_root, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trained = _trainer(universal_root, monkeypatch, tmp_path)
    trained.initialize()
    with torch.no_grad():
        trained.network.prompt.add_(1.0)  # a prompt no fresh initialisation gives
    trained.current_epoch = 3
    checkpoint = tmp_path / "checkpoint_final.pth"
    trained.save_checkpoint(str(checkpoint))
    saved = compat.read_checkpoint(checkpoint)

    trainer = _trainer(universal_root, monkeypatch, tmp_path / "resumed")
    trainer.initialize()
    assert not torch.equal(trainer.network.prompt.detach(), saved["network_weights"]["prompt"])  # fresh init
    trainer.load_checkpoint(str(checkpoint))
    assert torch.equal(trainer.network.prompt.detach(), saved["network_weights"]["prompt"])
    assert torch.equal(trainer.network.prompt.detach(), trained.network.prompt.detach())
    assert trainer.current_epoch == saved["current_epoch"] == 4  # nnU-Net saves the next epoch to run
    assert trainer.task_map == TaskMap.from_dict(saved["nnunet_ext_state"]["task_map"]) == trained.task_map
