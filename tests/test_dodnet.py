"""DoDNet: dynamic head vs a per-sample reference, size, plan strides, sigmoid label coding (round
trip, decision rule, nesting), gradients to the controller and the task code, the trainer's schedule
and network from the merged plans, and a stock train + task-aware predict on the merged synthetic
dataset (slow). The loss is tested in test_losses.py. Eval mode (mixed-task batches, task
dependence, masked class scores) is tested with TransDoDNet's, parametrised over both networks, in
test_transdodnet.py."""
from __future__ import annotations

import json

import pytest
import torch

from nnunet_ext import compat
from nnunet_ext.architectures.dodnet import DoDNet, SigmoidLabelCoding, dynamic_head, paper_dodnet, strides_from_plans
from nnunet_ext.tasks.task_map import TaskMap, TaskMapError
from nnunet_ext.testing.harness import NnUNetRoot, load_trainer, predict_task_and_check, train_stock
from nnunet_ext.trainers.dodnet import DODNET_PLANS_KEY, DoDNetTrainer, parse_nested

TRAINER = "DoDNetTrainer"
SMALL = dict(features=(32, 32, 32, 32), blocks=(1, 1, 1, 1), strides=[[1, 1, 1]] + [[2, 2, 2]] * 3)


def _task(name: str, task_id: int, labels: dict[str, int], channels: int = 1) -> dict:
    labels = {"background": 0, **labels}
    return {name: {"task_id": task_id, "source": f"Dataset9{task_id}_{name}", "case_prefix": f"T{task_id:02d}{name}_",
                   "num_channels": channels, "channel_names": {str(c): "CT" for c in range(channels)},
                   "labels": labels, "to_source": {str(v): i for i, v in enumerate(labels.values())}}}


def synthetic_map() -> TaskMap:
    """The merged synthetic family: liver+kidney, liver+spleen+lesion, kidney+spleen."""
    return TaskMap.from_dict({**_task("LiverKidney", 0, {"liver": 1, "kidney": 2}),
                              **_task("LiverSpleenLesion", 1, {"liver": 1, "spleen": 3, "lesion": 4}, 2),
                              **_task("KidneySpleen", 2, {"kidney": 2, "spleen": 3}, 4)})


def mots_like_map() -> TaskMap:
    """MOTS-like: an organ + tumour task, a tumour-only task, an organ-only task."""
    return TaskMap.from_dict({**_task("Liver", 0, {"liver": 1, "tumour": 2}), **_task("Colon", 1, {"tumour": 2}),
                              **_task("Spleen", 2, {"spleen": 3})})


# --- network ------------------------------------------------------------------------------------

def test_paper_configuration_has_the_papers_size():
    network = paper_dodnet()
    assert sum(p.numel() for p in network.parameters()) == 17_329_528  # the official model's count, exact
    assert sum(p.numel() for p in network.controller.parameters()) == 42_768
    assert network.controller.in_channels == 256 + 7 and network.controller.out_channels == 162


def test_dynamic_head_equals_a_per_sample_loop():
    torch.manual_seed(0)
    features, params = torch.randn(3, 8, 3, 4, 5), torch.randn(3, 8 * 8 + 8 * 8 + 8 * 2 + 8 + 8 + 2)
    batched = dynamic_head(features, params, 2)
    for b in range(3):  # official layout: the three weight blocks, then the three bias blocks
        w1, w2, w3 = params[b, :64].view(8, 8), params[b, 64:128].view(8, 8), params[b, 128:144].view(2, 8)
        b1, b2, b3 = params[b, 144:152], params[b, 152:160], params[b, 160:162]
        x = features[b].flatten(1)
        x = torch.relu(w1 @ x + b1[:, None])
        x = torch.relu(w2 @ x + b2[:, None])
        x = w3 @ x + b3[:, None]
        torch.testing.assert_close(batched[b], x.view(2, 3, 4, 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan_strides, patch", [
    ([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (4, 32, 16)),  # anisotropic, 6 stages
    ([[1, 1, 1], [2, 2, 2], [2, 2, 2]], (8, 8, 12)),  # a shallow plan: padded with stride 1
], ids=["anisotropic", "shallow"])
def test_plan_strides_keep_the_patch_size(plan_strides, patch):
    strides = strides_from_plans(plan_strides)
    assert len(strides) == 5 and strides[:min(5, len(plan_strides))] == plan_strides[:5]
    network = DoDNet(2, 3, 3, strides=strides)
    if len(plan_strides) >= 5:  # the paper's layers; a padded stride-1 stage has no projection shortcut
        assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in DoDNet(2, 3, 3).parameters())
    network.set_task(1)
    assert tuple(network(torch.randn(2, 2, *patch)).shape) == (2, 3, *patch)


def test_gradient_reaches_the_controller_and_the_task_code():
    torch.manual_seed(0)
    network = DoDNet(1, 3, 2, **SMALL)
    network.set_task(1)
    network(torch.randn(2, 1, 8, 8, 8)).square().mean().backward()
    grad = network.controller.weight.grad.flatten(1)  # (162, 32 pooled features + 3 task codes)
    assert grad[:, :32].abs().sum() > 0
    assert grad[:, 32 + 1].abs().sum() > 0  # the batch's task column
    assert grad[:, [32, 34]].abs().sum() == 0  # the other tasks' one-hot inputs were zero
    assert network.stem.weight.grad.abs().sum() > 0


def test_network_needs_a_task():
    with pytest.raises(Exception, match="nnunet-ext predict --task"):
        DoDNet(1, 3, 2, **SMALL)(torch.randn(1, 1, 8, 8, 8))


# --- label coding -------------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [{}, {"lesion": "liver"}], ids=["flat", "nested"])
def test_label_coding_round_trips_every_task(nested):
    task_map = synthetic_map()
    coding = SigmoidLabelCoding(task_map, nested)
    assert coding.head_channels == 3
    generator = torch.Generator().manual_seed(0)
    for task in task_map:
        values = torch.tensor([0, *task.annotated_values])
        labels = values[torch.randint(len(values), (2, 1, 5, 6, 7), generator=generator)]
        tasks = torch.full((2,), task.task_id)
        channels, valid = coding.encode(labels, tasks)
        assert valid[0].tolist() == [k < len(task.annotated_values) for k in range(3)]
        assert torch.equal(coding.decode(channels, tasks), labels), task.name
        assert channels[:, ~valid[0]].sum() == 0
    lesion_task = torch.ones(1, dtype=torch.long)
    lesion = torch.full((1, 1, 1, 1, 1), 4)
    channels, _ = coding.encode(lesion, lesion_task)
    # channels of liver+spleen+lesion: liver first (1), spleen (3), lesion (4) - parents before children
    assert channels.flatten().tolist() == ([1.0, 0.0, 1.0] if nested else [0.0, 0.0, 1.0])


def test_class_scores_follow_the_papers_decision_rule():
    coding = SigmoidLabelCoding(mots_like_map(), {"tumour": "liver"})
    z = torch.randn(4, 2, 1000, generator=torch.Generator().manual_seed(1)) * 3
    predicted = coding.class_logits(z, torch.zeros(4, dtype=torch.long)).argmax(1)
    organ, tumour = z[:, 0] > 0, z[:, 1] > 0
    expected = torch.where(organ & tumour, 2, torch.where(organ, 1, 0))
    assert torch.equal(predicted, expected)
    assert (organ & ~tumour).any() and (organ & tumour).any() and (~organ & tumour).any()
    # a tumour-only task (the paper's organ channel unannotated): one channel, tumour if p > 0.5
    colon = coding.class_logits(z, torch.ones(4, dtype=torch.long))
    assert torch.equal(colon.argmax(1), torch.where(z[:, 0] > 0, 2, 0))
    channels, valid = coding.encode(torch.tensor([2]).view(1, 1, 1), torch.ones(1, dtype=torch.long))
    assert valid.tolist() == [[True, False]] and channels.flatten().tolist() == [1.0, 0.0]


def test_flat_classes_take_the_most_confident_channel_above_one_half():
    coding = SigmoidLabelCoding(synthetic_map())
    z = torch.randn(2, 3, 500, generator=torch.Generator().manual_seed(2)) * 3
    scores = coding.class_logits(z, torch.ones(2, dtype=torch.long))  # liver, spleen, lesion -> 1, 3, 4
    best = z.argmax(1)
    expected = torch.where(z.amax(1) > 0, torch.tensor([1, 3, 4])[best], 0)
    assert torch.equal(scores.argmax(1), expected)


def test_bad_nesting_is_refused():
    with pytest.raises(TaskMapError, match="not labels"):
        SigmoidLabelCoding(synthetic_map(), {"tumor": "liver"})
    with pytest.raises(TaskMapError, match="cycle"):
        SigmoidLabelCoding(synthetic_map(), {"lesion": "liver", "liver": "lesion"})
    assert parse_nested(" lesion:liver, tumour:kidney ") == {"lesion": "liver", "tumour": "kidney"}
    with pytest.raises(ValueError, match="CHILD:PARENT"):
        parse_nested("lesion")


# --- trainer ------------------------------------------------------------------------------------

def _trainer(root: NnUNetRoot, monkeypatch, results) -> DoDNetTrainer:
    return load_trainer(root, DoDNetTrainer, monkeypatch, results)

def test_schedule_and_network_from_the_merged_plans(universal_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_EXT_NESTED_LABELS", "lesion:liver")
    trainer = _trainer(universal_root, monkeypatch, tmp_path)
    assert trainer.enable_deep_supervision is False
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (1000, 250)
    assert trainer.plans_manager.plans[DODNET_PLANS_KEY] == {"nested_labels": {"lesion": "liver"}}
    heads = trainer.label_manager.num_segmentation_heads
    inputs = trainer.task_map.max_channels
    network = DoDNetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                       inputs, heads, False)
    trainer.network = network
    assert isinstance(network, DoDNet) and network.head_channels == 3
    plan_strides = trainer.configuration_manager.network_arch_init_kwargs["strides"]
    assert network.strides == strides_from_plans(plan_strides)
    optimizer, scheduler = trainer.configure_optimizers()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-2, 0.99, True, 0.0)
    assert type(scheduler).__name__ == "PolyLRScheduler" and scheduler.exponent == 0.9
    network.decoder.deep_supervision = True  # nnU-Net's switch is accepted and changes nothing
    patch = tuple(trainer.configuration_manager.patch_size)
    network.set_task(1)
    assert tuple(network.train()(torch.randn(1, inputs, *patch)).shape) == (1, 3, *patch)


@pytest.fixture(scope="module")
def dodnet_model(universal_root):
    return train_stock(universal_root, TRAINER, NNUNET_EXT_NESTED_LABELS="lesion:liver")


@pytest.mark.slow
def test_stock_training_and_task_aware_prediction(universal_root, dodnet_model, tmp_path):
    plans = json.loads((dodnet_model / "plans.json").read_text())
    assert plans[DODNET_PLANS_KEY] == {"nested_labels": {"lesion": "liver"}}
    checkpoint = compat.read_checkpoint(dodnet_model / "fold_0" / "checkpoint_final.pth")
    assert "controller.weight" in checkpoint["network_weights"]
    log = next((dodnet_model / "fold_0").glob("training_log_*.txt")).read_text()
    assert "Pseudo dice per task:" in log  # nnU-Net's per-batch validation ran on the class scores
    assert (dodnet_model / "fold_0" / "validation" / "summary_per_task.json").is_file()
    predict_task_and_check(universal_root, TRAINER, 1, tmp_path / "pred")  # liver + spleen + lesion: the nested task
