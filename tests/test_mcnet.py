"""MC-Net+: network (shapes, plans, inference, sizes), loss against slow references, trainer, stock CLI."""
from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext import compat
from nnunet_ext.architectures.mcnet import MCNet, paper_mcnet, strides_from_plans
from nnunet_ext.testing.harness import run_stock
from nnunet_ext.trainers.base import METHOD_STATE_KEY
from nnunet_ext.losses.semi_supervised import MCNetDiceLoss, mutual_consistency_loss
from nnunet_ext.trainers.mcnet import MCNetPlusTrainer
from nnunet_ext.trainers.semi_supervised import sigmoid_rampup
from semi_support import SEMI_DATASET_ID, make_trainer, nnunet_environment, semi_root
from test_losses import reference_binary_dice_loss, reference_consistency


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_decoders,expected", [(3, 15_246_566), (2, 12_347_716), (1, 9_448_866)],
                         ids=["mcnet_plus", "mcnet", "vnet"])
def test_paper_parameter_counts_are_exact(num_decoders, expected):
    """Counted from the official classes: MC-Net+ 15,246,566, MC-Net 12,347,716, V-Net 9,448,866."""
    assert count(paper_mcnet(num_decoders)) == expected


def test_paper_encoder_and_decoder_sizes():
    """Official code: encoder 7.38 M; decoders 2.07 / 2.90 / 2.90 M (within 1%)."""
    network = paper_mcnet()
    assert abs(count(network.encoder) - 7.38e6) <= 0.01 * 7.38e6
    for decoder, paper in zip(network.decoder.decoders, (2.07e6, 2.90e6, 2.90e6)):
        assert abs(count(decoder) - paper) <= 0.01 * paper, (decoder.mode, count(decoder))


def test_decoders_differ_only_in_upsampling():
    network = paper_mcnet()
    first, second, third = network.decoder.decoders
    assert [d.mode for d in network.decoder.decoders] == ["transposed", "linear", "nearest"]
    assert isinstance(first.ups[0].conv, nn.ConvTranspose3d) and first.ups[0].conv.kernel_size == (2, 2, 2)
    for decoder, mode in ((second, "trilinear"), (third, "nearest")):
        up = decoder.ups[0].eval()
        assert isinstance(up.conv, nn.Conv3d) and up.conv.kernel_size == (3, 3, 3)
        x = torch.randn(1, up.conv.in_channels, 2, 3, 2)
        resized = F.interpolate(x, scale_factor=2, mode=mode, align_corners=True if mode == "trilinear" else None)
        assert torch.allclose(up(x), torch.relu(up.norm(up.conv(resized))), atol=1e-6)
    for decoder in network.decoder.decoders:
        assert (type(decoder.ups[0].norm), type(decoder.ups[0].act)) == (nn.BatchNorm3d, nn.ReLU)
        shapes = [p.shape for p in decoder.stages.parameters()] + [p.shape for p in decoder.head.parameters()]
        assert shapes == [p.shape for p in second.stages.parameters()] + [p.shape for p in second.head.parameters()]
    assert network.encoder.dropout.p == 0.5 and all(d.dropout.p == 0.5 for d in network.decoder.decoders)


PLANS = {  # name: (strides, patch)
    "isotropic": ([[2, 2, 2]] * 3, (16, 24, 16)),
    "anisotropic": ([[1, 2, 2], [1, 2, 2], [2, 2, 2]], (8, 24, 40)),
    "odd_but_divisible": ([[2, 2, 2], [2, 2, 2]], (12, 20, 28)),  # 3, 5, 7 voxels at the bottom
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("num_decoders", [1, 2, 3])
def test_training_returns_every_decoder_and_inference_one_tensor(plan, num_decoders):
    strides, patch = PLANS[plan]
    torch.manual_seed(0)
    network = MCNet(input_channels=2, num_classes=3, strides=strides, num_decoders=num_decoders, base_filters=4)
    outputs = network(torch.randn(2, 2, *patch))
    assert isinstance(outputs, list) and len(outputs) == num_decoders
    assert all(tuple(o.shape) == (2, 3, *patch) for o in outputs)
    network.eval()
    with torch.no_grad():
        single = network(torch.randn(1, 2, *patch))
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (1, 3, *patch)


def test_inference_is_decoder_one_or_the_mean_of_logits():
    torch.manual_seed(0)
    network = MCNet(input_channels=1, num_classes=3, strides=[[1, 2, 2], [2, 2, 2]], base_filters=4).eval()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        network.decoder.deep_supervision = True  # nnU-Net's switch: all decoders also in eval mode
        every = network(x)
        network.decoder.deep_supervision = False
        first = network(x)
        network.decoder.inference = "mean"
        mean = network(x)
    assert len(every) == 3 and not torch.allclose(every[0], every[1])
    assert torch.equal(first, every[0])
    assert torch.allclose(mean, torch.stack(every).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="inference"):
        MCNet(1, 2, inference="vote")


def test_input_not_divisible_by_the_total_stride_is_refused():
    network = MCNet(1, 2, strides=[[1, 2, 2], [2, 2, 2]], base_filters=4)
    with pytest.raises(ValueError, match=r"not divisible by its total stride \(2, 4, 4\)"):
        network(torch.randn(1, 1, 8, 16, 18))


def test_downsampling_from_nnunet_plans():
    plans = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert strides_from_plans(plans) == plans[1:5]  # the paper's depth: 4 downsamplings
    assert strides_from_plans(plans[:3]) == plans[1:3]  # fewer where the plans have fewer
    with pytest.raises(ValueError, match="MC-Net\\+ keeps its first stage at full resolution"):
        strides_from_plans([[2, 2, 2], [2, 2, 2]])
    with pytest.raises(ValueError, match="no downsampling"):
        strides_from_plans([[1, 1, 1]])


def test_consistency_alone_trains_the_encoder_and_every_decoder():
    torch.manual_seed(0)
    network = MCNet(1, 2, strides=[[2, 2, 2], [2, 2, 2]], base_filters=4)
    outputs = network(torch.randn(2, 1, 8, 16, 16))
    mutual_consistency_loss([torch.softmax(o, 1) for o in outputs]).backward()
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient for {name}"


def loss_only_trainer(iteration: int = 0) -> MCNetPlusTrainer:
    """The trainer's loss methods without a dataset (only ``loss`` and ``training_iteration`` are used)."""
    trainer = object.__new__(MCNetPlusTrainer)
    trainer.loss, trainer.training_iteration = MCNetDiceLoss(), iteration
    return trainer


def test_loss_is_half_the_decoders_dice_on_labelled_plus_weighted_consistency_on_all():
    torch.manual_seed(2)
    outputs = [torch.randn(4, 2, 4, 6, 6) for _ in range(3)]
    target = torch.randint(0, 2, (2, 1, 4, 6, 6))
    trainer = loss_only_trainer(iteration=449)  # official iter 450 -> ramp-up step 3
    dice = sum(reference_binary_dice_loss(torch.softmax(o[:2], 1), target) for o in outputs)
    consistency = reference_consistency([torch.softmax(o, 1).numpy() for o in outputs])
    expected = 0.5 * dice + sigmoid_rampup(3, 40) * consistency
    assert trainer.compute_loss(outputs, target, 2).item() == pytest.approx(expected, rel=1e-5)

    supervised, consistent = trainer.loss_terms(outputs, target, 2)
    changed_unlabelled = [o.clone() for o in outputs]
    changed_unlabelled[1][2:] += 3 * torch.randn_like(changed_unlabelled[1][2:])
    supervised_u, consistent_u = trainer.loss_terms(changed_unlabelled, target, 2)
    assert supervised_u.item() == supervised.item(), "unlabelled patches must not reach the supervised term"
    assert abs(consistent_u.item() - consistent.item()) > 1e-4, "unlabelled patches must reach the consistency"
    changed_labelled = [o.clone() for o in outputs]
    changed_labelled[2][:2] += 3 * torch.randn_like(changed_labelled[2][:2])
    assert abs(trainer.loss_terms(changed_labelled, target, 2)[0].item() - supervised.item()) > 1e-4


@pytest.mark.parametrize("iteration,step", [(0, 0), (148, 0), (149, 1), (299, 2), (5998, 39), (5999, 40),
                                            (14999, 100)])
def test_ramp_up_weight_follows_the_official_step_number(iteration, step):
    assert loss_only_trainer(iteration).consistency_weight() == pytest.approx(sigmoid_rampup(step, 40))


def test_ramp_up_continues_from_the_checkpointed_iteration():
    trainer = loss_only_trainer(0)
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.load_method_state({"training_iteration": 299})
    assert trainer.training_iteration == 299 and trainer.consistency_weight() == sigmoid_rampup(2, 40)
    assert loss_only_trainer(0).consistency_weight() == pytest.approx(math.exp(-5))


def test_paper_optimiser_constant_lr_and_15000_iterations(monkeypatch):
    """Our constructor's settings and optimiser, without a dataset (the base constructor is stubbed)."""
    from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer

    monkeypatch.setattr(nnUNetSemiSupervisedTrainer, "__init__", lambda self, *args, **kwargs: None)
    trainer = MCNetPlusTrainer({}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert trainer.enable_deep_supervision is False and trainer.grad_clip is None
    assert trainer.num_epochs * trainer.num_iterations_per_epoch == 15_000
    trainer.network = MCNet(1, 2, strides=[[2, 2, 2]], base_filters=4)
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.01, 0.9, 1e-4, False)
    assert group["params"] == list(trainer.network.parameters())
    for epoch in (0, 1, 30, 59, 60):
        scheduler.step(epoch)  # as nnU-Net's on_train_epoch_start
        assert optimizer.param_groups[0]["lr"] == 0.01, "the paper's learning rate is constant"


def test_no_gradient_clipping_unless_asked():
    trainer = loss_only_trainer()
    trainer.grad_scaler = None
    trainer.network = nn.Linear(2, 1)
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.0)
    loss = 1000 * trainer.network(torch.ones(1, 2)).sum()
    trainer.optimizer_step(loss)
    assert trainer.network.weight.grad.norm() > 12  # the base would have clipped it to 12


def test_network_from_plans_follows_the_strides_and_refuses_2d():
    from types import SimpleNamespace

    from nnunet_ext.trainers.mcnet import mcnet_from_plans

    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    network = mcnet_from_plans(SimpleNamespace(patch_size=[32, 128, 128], pool_op_kernel_sizes=strides), 2, 4)
    assert network.strides == strides[1:5] and network.total_stride == (8, 16, 16)
    assert network.encoder.stages[0][0].in_channels == 2 and network.decoder.decoders[2].head.out_channels == 4
    with pytest.raises(ValueError, match="3D network.*3d_fullres"):
        mcnet_from_plans(SimpleNamespace(patch_size=[64, 64], pool_op_kernel_sizes=[[1, 1], [2, 2]]), 1, 2)


def test_constructor_signature_is_nnunets():
    def shape(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert shape(MCNetPlusTrainer) == shape(compat.base_trainer_class())


# ---------------------------------------------------------------------------------------------
# trainer on a real preprocessed dataset (nnU-Net's default plans), and the stock CLI
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return semi_root(tmp_path_factory)


@pytest.mark.slow  # the dataset's planning and preprocessing take minutes on a loaded CPU
def test_trainer_builds_mcnet_from_nnunet_default_plans(root):
    with nnunet_environment(root):
        trainer = make_trainer(root, MCNetPlusTrainer, fold=0)
    assert trainer.enable_deep_supervision is False and trainer._get_deep_supervision_scales() is None
    configuration = trainer.configuration_manager
    network = MCNetPlusTrainer.build_network_architecture(trainer.plans_manager, configuration, 1,
                                                          trainer.label_manager.num_segmentation_heads, False)
    assert network.strides == strides_from_plans(configuration.pool_op_kernel_sizes)
    patch = tuple(configuration.patch_size)
    outputs = network(torch.randn(2, 1, *patch))
    assert len(outputs) == 3 and all(tuple(o.shape[2:]) == patch for o in outputs)
    trainer.network = network
    trainer.set_deep_supervision_enabled(False)  # nnU-Net's own switch works on MCNet
    network.eval()
    with torch.no_grad():
        assert isinstance(network(torch.randn(1, 1, *patch)), torch.Tensor)


@pytest.mark.slow
def test_stock_train_continue_predict_evaluate(root):
    """nnUNetv2_train (1 epoch x 2 iterations, 2 labelled + 2 unlabelled from imagesUnlabeled), --c to
    a second epoch (training_iteration continues), nnUNetv2_predict, nnUNetv2_evaluate_folder."""
    trainer = "MCNetPlusTrainer"
    env = dict(nnUNet_n_proc_DA="0")
    command = ["nnUNetv2_train", SEMI_DATASET_ID, "3d_fullres", 0, "-tr", trainer, "-device", "cpu"]
    model_folder = root.results / root.dataset_name / f"{trainer}__nnUNetPlans__3d_fullres"
    fold = model_folder / "fold_0"
    first = run_stock(command, root.env(epochs=1, iterations=2, **env))
    output = first.stdout + first.stderr
    assert "2 labelled + 2 unlabelled patches" in output
    assert "MC-Net+: training iteration 0, consistency weight 0.006738" in output
    checkpoint = compat.read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint[METHOD_STATE_KEY]["training_iteration"] == 2
    assert any(key.startswith("decoder.decoders.2.") for key in checkpoint["network_weights"])
    assert (fold / "validation" / "summary.json").is_file()

    second = run_stock(command + ["--c"], root.env(epochs=2, iterations=2, **env))
    output = second.stdout + second.stderr
    assert "resumed at training iteration 2" in output
    assert "MC-Net+: training iteration 2," in output and "Epoch 0" not in output
    checkpoint = compat.read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 2 and checkpoint[METHOD_STATE_KEY]["training_iteration"] == 4
    lrs = re.findall(r"Current learning rate: ([0-9.]+)", output)
    assert lrs and all(float(lr) == 0.01 for lr in lrs)

    predictions = root.path / "predictions" / trainer
    run_stock(["nnUNetv2_predict", "-i", root.dataset_raw / "imagesTs", "-o", predictions, "-d", SEMI_DATASET_ID,
               "-c", "3d_fullres", "-f", 0, "-tr", trainer, "-device", "cpu", "-npp", 1, "-nps", 1,
               "--disable_progress_bar"], root.env())
    run_stock(["nnUNetv2_evaluate_folder", root.dataset_raw / "labelsTs", predictions, "-djfile",
               model_folder / "dataset.json", "-pfile", model_folder / "plans.json", "-np", 1], root.env())
    import json

    summary = json.loads((predictions / "summary.json").read_text())
    references = sorted((root.dataset_raw / "labelsTs").glob("*.nii.gz"))
    assert references and len(summary["metric_per_case"]) == len(references)
    assert all(0.0 <= m["Dice"] <= 1.0 or np.isnan(m["Dice"]) for m in summary["mean"].values())
