"""LeFeD: network (shapes, gating, feedback, size), loss, three-pass step, lr schedule, stock pipeline."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from nnunet_ext import compat
from nnunet_ext.architectures.blocks.vnet import upsample
from nnunet_ext.architectures.lefed import LeFeD, LeFeDOutput, discrepancy_feedback, paper_lefed, strides_from_plans
from nnunet_ext.trainers.base import METHOD_STATE_KEY
from nnunet_ext.losses.semi_supervised import LeFeDLoss
from nnunet_ext.trainers.lefed import IterationStepLR, LeFeDTrainer, lefed_learning_rate


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(input_channels: int = 1, num_classes: int = 2, strides=((2, 2, 2),) * 4, **kwargs) -> LeFeD:
    torch.manual_seed(0)
    return LeFeD(input_channels=input_channels, num_classes=num_classes, strides=strides, base_features=4, **kwargs)


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
def test_paper_configuration_has_the_papers_parameter_count():
    network = paper_lefed()
    assert count(network) == 12_348_718
    parts = (network.encoder, network.decoder.decoder1, network.decoder.decoder2, network.decoder.side)
    assert [count(m) for m in parts] == [7_376_896, 2_071_970, 2_898_850, 1_002]  # official code: 7.38/2.07/2.90 M


def test_strides_from_plans_take_the_plans_first_four_downsamplings():
    assert strides_from_plans([[1, 1, 1]] + [[2, 2, 2]] * 5) == [[2, 2, 2]] * 4
    assert strides_from_plans([[1, 1, 1], [1, 2, 2], [2, 2, 2]]) == [[1, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1]]
    assert strides_from_plans([1, 2, 2, 2, 2], dim=2) == [[2, 2]] * 4
    with pytest.raises(ValueError, match="first stride is \\[2, 2, 2\\]"):
        strides_from_plans([[2, 2, 2]] * 5)


@pytest.mark.parametrize("plan_strides, patch, channels, classes", [
    ([[1, 1, 1]] + [[2, 2, 2]] * 4, (32, 32, 32), 1, 2),  # official isotropic
    ([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (16, 48, 32), 2, 3),  # anisotropic, 6 stages
    ([[1, 1, 1], [2, 2, 2], [2, 2, 2]], (8, 12, 8), 1, 4),  # fewer stages than the V-Net: padded with stride 1
    ([[1, 1]] + [[2, 2]] * 5, (32, 64), 3, 2),  # 2D plans
])
def test_shapes_follow_the_plans(plan_strides, patch, channels, classes):
    strides = strides_from_plans(plan_strides, len(patch))
    network = tiny(channels, classes, strides)
    x = torch.randn(2, channels, *patch)
    out = network(x)
    assert isinstance(out, LeFeDOutput)
    assert out.logits1.shape == out.logits2.shape == (2, classes, *patch)
    assert len(out.side) == 5 and all(s.shape == (2, classes, *patch) for s in out.side)
    size = list(patch)
    for k in range(5):  # features at encoder stage k's resolution and width, full resolution first
        assert out.features1[k].shape == out.features2[k].shape == (2, 4 * 2 ** k, *size)
        if k < 4:
            size = [n // s for n, s in zip(size, strides[k])]
    network.eval()
    network.decoder.deep_supervision = False  # what nnU-Net's predictor builds
    with torch.no_grad():
        prediction = network(x)
    assert isinstance(prediction, torch.Tensor) and prediction.shape == (2, classes, *patch)
    assert torch.allclose(prediction, network(x, training_outputs=True).logits1)


def test_inference_runs_decoder_1_only_in_one_pass():
    network = tiny().eval()
    network.decoder.deep_supervision = False
    calls = []
    for name in ("decoder1", "decoder2", "side"):
        getattr(network.decoder, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    network(torch.randn(1, 1, 16, 16, 16))
    assert calls == ["decoder1"]


def test_side_outputs_are_stagewise_linear_upsamplings_of_1x1_heads():
    network = tiny().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    out = network(x, training_outputs=True)
    head = network.decoder.side.heads[3]
    expected = head(out.features1[3])
    for _ in range(3):
        expected = torch.nn.functional.interpolate(expected, scale_factor=2, mode="trilinear", align_corners=True)
    assert torch.allclose(out.side[3], expected, atol=1e-6)
    assert torch.equal(upsample(expected, (1, 1, 1), "trilinear"), expected)


def test_decoder_2_is_gated_by_detached_decoder_1_features():
    network = tiny().eval()  # no dropout: the same forward twice gives the same numbers
    x = torch.randn(2, 1, 16, 16, 16)
    out = network(x, training_outputs=True)
    skips = network.encoder(x)
    gates = [torch.sigmoid(f) for f in out.features1]
    # the gate formula: bottleneck x5 + x5 * w5, skips x_k * w_k
    assert torch.allclose(out.features2[4], skips[4] + skips[4] * gates[4])
    ungated, _ = network.decoder.decoder2(skips)
    assert torch.allclose(network.decoder.decoder2(skips, [g.detach() for g in gates])[0], out.logits2)
    assert not torch.allclose(ungated, out.logits2)

    out.logits2.sum().backward()
    assert all(p.grad is None for p in network.decoder.decoder1.parameters()), "gradient leaked through the gate"
    assert all(p.grad is not None for p in network.encoder.parameters())
    # control: the same decoder 2 with non-detached gates does reach decoder 1 (so the check above can fail)
    network.zero_grad(set_to_none=True)
    logits1, features1 = network.decoder.decoder1(network.encoder(x))
    network.decoder.decoder2(network.encoder(x), [torch.sigmoid(f) for f in features1])[0].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.decoder.decoder1.parameters())


def test_feedback_is_added_to_the_encoder_stages_and_detached():
    network = tiny().eval()
    x = torch.randn(2, 1, 16, 16, 16)
    out = network(x, training_outputs=True)
    feedback = discrepancy_feedback(out)
    assert all(not f.requires_grad for f in feedback)
    assert all(torch.allclose(f, 1e-3 * (b - a)) for f, a, b in zip(feedback, out.features1, out.features2))
    plain, fed = network.encoder(x), network.encoder(x, feedback)
    assert torch.allclose(fed[0], plain[0] + feedback[0]), "stage 1 output + feedback"
    assert all(not torch.equal(a, b) for a, b in zip(plain, fed)), "every stage changes"
    big = [torch.ones_like(f) for f in feedback]
    assert not torch.allclose(network(x, big, True).logits1, out.logits1)
    with pytest.raises(ValueError, match="5 tensors"):
        network(x, feedback[:4])


# ---------------------------------------------------------------------------------------------
# trainer pieces, on a trainer made without its constructor (no dataset needed)
# ---------------------------------------------------------------------------------------------
class CountingSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def bare_trainer(network: LeFeD) -> LeFeDTrainer:
    trainer = LeFeDTrainer.__new__(LeFeDTrainer)
    trainer.network, trainer.device, trainer.grad_scaler, trainer.is_ddp = network, torch.device("cpu"), None, False
    trainer.initial_lr, trainer.momentum, trainer.weight_decay = 0.01, 0.9, 1e-4
    trainer.lr_step_size, trainer.lr_gamma = 2500, 0.1
    trainer.training_iteration = 0
    trainer.lefed_loss = LeFeDLoss()
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    return trainer


def test_trainer_keeps_nnunets_constructor_signature():
    def shape(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert shape(LeFeDTrainer) == shape(compat.base_trainer_class())


def test_three_passes_three_steps_first_without_feedback():
    network = tiny()
    trainer = bare_trainer(network)
    trainer.optimizer = CountingSGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    trainer.lr_scheduler = IterationStepLR(trainer.optimizer, 0.01, lambda: trainer.training_iteration)
    seen, losses, steps_at_forward = [], [], []
    forward, compute_loss = network.forward, trainer.compute_loss

    def recording_forward(x, feedback=None, training_outputs=None):
        steps_at_forward.append(trainer.optimizer.steps)
        out = forward(x, feedback, training_outputs)
        seen.append((feedback, out))
        return out

    def recording_loss(outputs, target, labeled_count):
        value = compute_loss(outputs, target, labeled_count)
        losses.append(float(value.detach()))
        return value

    network.forward, trainer.compute_loss = recording_forward, recording_loss
    batch = {"data": torch.randn(4, 1, 16, 16, 16), "target": torch.randint(0, 2, (2, 1, 16, 16, 16)).float(),
             "labeled_count": 2}
    result = trainer.train_step(batch)
    assert trainer.optimizer.steps == 3 and steps_at_forward == [0, 1, 2], "each pass: its own step, in turn"
    assert seen[0][0] is None and all(isinstance(f, list) and len(f) == 5 for f, _ in seen[1:])
    for (_, previous), (feedback, _) in zip(seen, seen[1:]):  # feedback = previous pass's detached discrepancy
        assert all(torch.allclose(f, 1e-3 * (b - a).detach()) and not f.requires_grad
                   for f, a, b in zip(feedback, previous.features1, previous.features2))
    assert float(result["loss"]) == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert trainer.training_iteration == 1, "one batch = one iteration of the lr schedule"


def test_lr_steps_every_2500_iterations_from_the_checkpointed_counter():
    assert [lefed_learning_rate(i) for i in (0, 2499)] == [0.01, 0.01]
    assert lefed_learning_rate(2500) == pytest.approx(1e-3) and lefed_learning_rate(4999) == pytest.approx(1e-3)
    assert lefed_learning_rate(5000) == pytest.approx(1e-4) and lefed_learning_rate(14999) == pytest.approx(1e-7)
    network = tiny()
    trainer = bare_trainer(network)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.01, 0.9, 1e-4, False)
    trainer.training_iteration = 2500  # as restored from a checkpoint by --c
    trainer.lr_scheduler.step(7)  # nnU-Net's epoch-start call: the epoch is ignored
    assert group["lr"] == pytest.approx(1e-3)
    trainer.training_iteration = 4999
    batch = {"data": torch.randn(2, 1, 16, 16, 16), "target": torch.zeros(1, 1, 16, 16, 16), "labeled_count": 1}
    trainer.train_step(batch)
    assert group["lr"] == pytest.approx(1e-3) and trainer.training_iteration == 5000
    trainer.train_step(batch)
    assert group["lr"] == pytest.approx(1e-4)


def test_network_from_plans_and_deep_supervision_switch():
    configuration = SimpleNamespace(network_arch_init_kwargs={"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]},
                                    pool_op_kernel_sizes=None, patch_size=[8, 16, 16])
    network = LeFeDTrainer.build_network_architecture(None, configuration, 2, 3, enable_deep_supervision=False)
    assert network.strides == ((1, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1))
    assert network.decoder.deep_supervision is False
    trainer = bare_trainer(network)
    trainer.set_deep_supervision_enabled(True)  # nnU-Net's own method flips network.decoder.deep_supervision
    x = torch.randn(1, 2, 8, 16, 16)
    assert isinstance(network(x), LeFeDOutput)
    trainer.set_deep_supervision_enabled(False)
    assert isinstance(network(x), torch.Tensor)


# ---------------------------------------------------------------------------------------------
# end to end: stock train (with unlabelled data), predict, evaluate, then --c
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stock_pipeline_and_continue(tmp_path_factory):
    from nnunet_ext.testing.harness import check_pipeline_outputs, run_stock, run_stock_pipeline
    from semi_support import semi_root

    root = semi_root(tmp_path_factory)
    env = {"nnUNet_n_proc_DA": "0"}
    result = run_stock_pipeline(root, "LeFeDTrainer", extra_env=env)
    check_pipeline_outputs(root, result)
    assert "2 labelled + 2 unlabelled patches" in result.train_output
    checkpoint = compat.read_checkpoint(result.fold_folder / "checkpoint_final.pth")
    assert checkpoint[METHOD_STATE_KEY]["training_iteration"] == 2
    assert any(k.startswith("decoder.decoder2.") for k in checkpoint["network_weights"])
    group = checkpoint["optimizer_state"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)

    second = run_stock(["nnUNetv2_train", root.dataset_id, "3d_fullres", 0, "-tr", "LeFeDTrainer", "-device", "cpu",
                        "--c"], root.env(epochs=2, iterations=2, **env))
    assert "resumed at training iteration 2" in second.stdout + second.stderr
    checkpoint = compat.read_checkpoint(result.fold_folder / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 2 and checkpoint[METHOD_STATE_KEY]["training_iteration"] == 4
