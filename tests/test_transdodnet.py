"""TransDoDNet: size against the official code, DeepNorm (residual scale whatever the flag, the flag's
init, the official coefficients), plan strides, shapes on a narrow variant, gradients to the task
queries and the decoder's deformable cross-attention; in eval mode, for DoDNet and TransDoDNet
alike (parametrised), task dependence, mixed-task batches and the masked class scores; per-sample
masking of unannotated classes; the official optimiser / warm-up + poly schedule / clipping, and a
stock train + task-aware predict on the merged synthetic dataset (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_ext import compat
from nnunet_ext.architectures.blocks.deformable_attention import MultiScaleDeformableAttention3D
from nnunet_ext.architectures.dodnet import DoDNet, SigmoidLabelCoding
from nnunet_ext.architectures.transdodnet import (PAPER_STRIDES, TransDoDAttention, TransDoDNet,
                                                  deepnorm_coefficients, paper_transdodnet, strides_from_plans)
from nnunet_ext.losses.task_sigmoid import DoDNetLoss
from nnunet_ext.tasks.conditioning import TaskConditioning, is_masked
from nnunet_ext.testing.harness import load_trainer, predict_task_and_check, train_stock
from nnunet_ext.trainers.transdodnet import TransDoDNetTrainer, WarmupPolyLRScheduler
from test_dodnet import SMALL as DODNET_SMALL
from test_dodnet import synthetic_map

TRAINER = "TransDoDNetTrainer"
# narrow and shallow, same structure: 3 transformer levels, 2 decoder layers, 2 heads, 2 points
SMALL = dict(strides=[[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]], blocks=(1, 1, 1, 1),
             widths=(4, 4, 4, 4), stem_channels=8, expansion=2, decoder_channels=(8, 8, 8, 8), hidden=24, heads=2,
             ffn=32, encoder_layers=1, decoder_layers=2, points=2)
PATCH = (8, 32, 32)


def _small(num_tasks: int = 3, head_channels: int = 2, **kwargs) -> TransDoDNet:
    torch.manual_seed(0)
    return TransDoDNet(1, num_tasks, head_channels, **{**SMALL, **kwargs})


# --- network ------------------------------------------------------------------------------------

def test_paper_configuration_has_the_official_size():
    network = paper_transdodnet()
    # 39,049,941 = the official TransDoD model (train.py defaults: ResNet-50, add_memory=2, 7 queries),
    # counted by instantiating jianpengz/DoDNet TransDoD/models/TransDoDNet.py; the paper gives none
    assert sum(p.numel() for p in network.parameters()) == 39_049_941
    assert sum(p.numel() for p in network.controller.parameters()) == 192 * 192 + 192 + 192 * 162 + 162
    assert network.query_decoder.query_embed.weight.shape == (7, 2 * 192)
    assert len(network.encoder.layers) == 3 and len(network.query_decoder.layers) == 3
    attention = network.query_decoder.layers[0].cross_attn
    assert isinstance(attention, TransDoDAttention) and isinstance(attention, MultiScaleDeformableAttention3D)
    assert (attention.n_levels, attention.n_heads, attention.n_points) == (3, 8, 4)
    assert network.strides == [list(s) for s in PAPER_STRIDES]
    # official fixed offset normalisers, finest level first
    assert attention._offset_normalizer(torch.zeros(3, 3, dtype=torch.long))[:, 0].tolist() == [64.0, 32.0, 16.0]
    (encoder_alpha, _), _ = deepnorm_coefficients(3, 3)
    assert network.encoder.layers[0].res_scale == pytest.approx(encoder_alpha)
    assert network.query_decoder.layers[0].res_scale == pytest.approx(3 ** 0.5)


def test_deepnorm_coefficients_are_the_official_ones():
    """Official ``deepnorm.get_deepnorm_coefficients``: (alpha, beta) per side."""
    encoder, decoder = deepnorm_coefficients(3, 3)
    assert encoder == pytest.approx((0.81 * (3 ** 4 * 3) ** 0.0625, 0.87 * (3 ** 4 * 3) ** -0.0625))
    assert decoder == pytest.approx((9 ** 0.25, 36 ** -0.25))
    encoder, decoder = deepnorm_coefficients(3, 0)
    assert encoder == pytest.approx((6 ** 0.25, 24 ** -0.25)) and decoder == (1.0, 1.0)
    encoder, decoder = deepnorm_coefficients(0, 2)
    assert encoder == (1.0, 1.0) and decoder == pytest.approx((4 ** 0.25, 16 ** -0.25))


@pytest.mark.parametrize("deepnorm", [True, False])
def test_residual_scale_applies_whatever_the_deepnorm_flag(deepnorm):
    """Official: every layer gets ``res_scale=alpha``; ``deepnorm`` only chooses the initialisation."""
    network = _small(deepnorm=deepnorm)
    (encoder_alpha, _), (decoder_alpha, _) = deepnorm_coefficients(SMALL["encoder_layers"], SMALL["decoder_layers"])
    assert encoder_alpha != 1.0 and decoder_alpha != 1.0
    assert [layer.res_scale for layer in network.encoder.layers] == [pytest.approx(encoder_alpha)]
    assert [layer.res_scale for layer in network.query_decoder.layers] == [pytest.approx(decoder_alpha)] * 2


def test_deepnorm_flag_chooses_deepnorm_or_deformable_detr_init():
    """DeepNorm's init (official ``_deepnorm_init``) overwrites every weight matrix of the transformer
    layers (the zero offset and attention-weight matrices of DETR's init included); biases keep the
    attention's own init in both."""
    detr, deepnorm = _small(deepnorm=False), _small(deepnorm=True)
    for network in (detr, deepnorm):
        attention = network.encoder.layers[0].self_attn
        assert attention.attention_weights.bias.abs().sum() == 0 and attention.sampling_offsets.bias.abs().sum() > 0
    for layer in (detr.encoder.layers[0].self_attn, detr.query_decoder.layers[0].cross_attn):
        assert layer.sampling_offsets.weight.abs().sum() == 0 and layer.attention_weights.weight.abs().sum() == 0
    for layer in (deepnorm.encoder.layers[0].self_attn, deepnorm.query_decoder.layers[0].cross_attn):
        assert layer.sampling_offsets.weight.abs().sum() > 0 and layer.attention_weights.weight.abs().sum() > 0
    assert detr.query_decoder.reference_points.bias.abs().sum() == 0  # DETR's zero bias; DeepNorm keeps nn.Linear's
    assert deepnorm.query_decoder.reference_points.bias.abs().sum() > 0


@pytest.mark.parametrize("plan_strides, expected", [
    ([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [list(s) for s in PAPER_STRIDES]),
    ([[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]),
    ([1, 2, 2, 2, 2, 2, 2], [[2, 2, 2]] * 5),
])
def test_strides_from_plans(plan_strides, expected):
    assert strides_from_plans(plan_strides) == expected


def test_shapes_on_a_narrow_variant():
    network = _small().train()
    network.set_task(1)
    x = torch.randn(2, 1, *PATCH)
    assert tuple(network(x).shape) == (2, 2, *PATCH)
    features = network.backbone(x)
    assert [tuple(f.shape[2:]) for f in features] == [(8, 16, 16), (4, 8, 8), (2, 4, 4), (2, 2, 2), (2, 2, 2)]
    encoded = network.encoder.encode([p(f) for p, f in zip(network.input_proj, features[-3:])])
    assert encoded.spatial_shapes == ((2, 4, 4), (2, 2, 2), (2, 2, 2))  # Python ints: no device sync
    assert tuple(network.query_decoder(encoded).shape) == (2, 3, 24)


def test_gradient_reaches_task_queries_and_the_decoders_cross_attention():
    network = _small().train()
    network.set_task(2)
    network(torch.randn(2, 1, *PATCH)).square().mean().backward()
    assert network.query_decoder.query_embed.weight.grad[2].abs().sum() > 0
    assert network.query_decoder.reference_points.weight.grad.abs().sum() > 0
    for layer in network.query_decoder.layers:
        for projection in (layer.cross_attn.sampling_offsets, layer.cross_attn.attention_weights,
                           layer.cross_attn.value_proj):
            assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert network.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert network.backbone.stem[0].weight.grad.abs().sum() > 0


# --- eval mode: DoDNet and TransDoDNet -----------------------------------------------------------

def _conditioned(network_class: str, head_channels: int, batch: int, coding=None):
    """A narrow DoDNet or TransDoDNet with 3 tasks, and an input batch for it."""
    if network_class == "DoDNet":
        torch.manual_seed(0)
        return DoDNet(1, 3, head_channels, coding=coding, **DODNET_SMALL), torch.randn(batch, 1, 8, 8, 8)
    return _small(3, head_channels, coding=coding), torch.randn(batch, 1, *PATCH)


@pytest.mark.parametrize("network_class", ["DoDNet", "TransDoDNet"])
def test_tasks_change_the_output_and_a_mixed_batch_equals_one_task_at_a_time(network_class):
    network, x = _conditioned(network_class, 2, 3)
    network.eval()  # no coding: eval returns the sigmoid logits, dropout off
    tasks = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = network(x, tasks)
        for b, task in enumerate(tasks.tolist()):
            network.set_task(task)
            torch.testing.assert_close(mixed[b:b + 1], network(x[b:b + 1]), rtol=1e-4, atol=1e-5)
        network.set_task(0)
        other = network(x[1:2])
        network.set_task(1)
        assert not torch.allclose(other, network(x[1:2]), atol=1e-4)  # the task changes the head


@pytest.mark.parametrize("network_class", ["DoDNet", "TransDoDNet"])
def test_eval_mode_returns_masked_class_scores_with_the_coding_rule(network_class):
    coding = SigmoidLabelCoding(synthetic_map(), {"lesion": "liver"})
    network, x = _conditioned(network_class, 3, 2, coding)
    network.set_task(0)  # liver + kidney: spleen (3) and lesion (4) are not annotated
    assert network.train()(x).shape[1] == 3  # training: the sigmoid logits
    with torch.no_grad():
        scores = network.eval()(x)
        assert scores.shape[1] == 5
        keep = torch.tensor([True, True, True, False, False])
        assert is_masked(scores, keep)[:, 3:].all() and not is_masked(scores, keep)[:, :3].any()
        expected = coding.class_logits(network.head_logits(x), torch.zeros(2, dtype=torch.long)).argmax(1)
        assert torch.equal(scores.argmax(1), expected)
        # per-sample tasks: each sample's scores are masked by its own task (task 2: kidney + spleen)
        mixed = network(x, torch.tensor([0, 2]))
        assert torch.equal(mixed[:1], scores[:1])
        keep2 = torch.tensor([True, False, True, True, False])
        assert is_masked(mixed[1:], keep2)[:, [1, 4]].all() and not is_masked(mixed[1:], keep2)[:, [0, 2, 3]].any()


def test_mask_unannotated_masks_each_sample_by_its_own_task():
    """``TaskConditioning.mask_unannotated`` with one task per sample (a ``(B,)`` tensor): each sample's
    unannotated classes are masked by ITS task, its own classes keep their logits, and the result
    equals masking each sample alone with its task set; training mode masks nothing."""
    annotated = torch.tensor([[True, True, True, False, False], [True, False, True, True, False],
                              [True, True, False, False, True]])

    class Conditioned(TaskConditioning):
        def __init__(self):
            super().__init__()
            self.init_task_conditioning(3, annotated.tolist(), 5)

    network, tasks = Conditioned().eval(), torch.tensor([2, 0, 1, 2])
    logits = torch.randn(4, 5, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    masked = network.mask_unannotated(logits, tasks)
    for b, task in enumerate(tasks.tolist()):
        keep = annotated[task]
        flags = is_masked(masked[b:b + 1], keep)
        assert flags[:, ~keep].all() and not flags[:, keep].any()
        assert torch.equal(masked[b, keep], logits[b, keep])
        assert keep[masked[b].argmax(0)].all()  # argmax only among the sample's own task's classes
        network.set_task(task)
        assert torch.equal(network.mask_unannotated(logits[b:b + 1]), masked[b:b + 1])
    assert network.train().mask_unannotated(logits, tasks) is logits


# --- trainer ------------------------------------------------------------------------------------

def test_warmup_then_poly_schedule():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], 2e-4, weight_decay=1e-4)
    scheduler = WarmupPolyLRScheduler(optimizer, 2e-4, 1000, warmup=10)
    expected = {0: 2e-6, 5: 2e-4 * (0.01 + 0.99 * 0.5), 9: 2e-4 * (0.01 + 0.99 * 0.9), 10: 2e-4 * 0.99 ** 0.9,
                500: 2e-4 * 0.5 ** 0.9, 999: 2e-4 * 0.001 ** 0.9}
    for epoch, lr in expected.items():
        scheduler.step(epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-9)


def test_optimiser_and_clipping_at_0_1(monkeypatch):
    """configure_optimizers and train_step on a narrow network; the trainer's data side is not needed."""
    coding = SigmoidLabelCoding(synthetic_map(), {"lesion": "liver"})
    trainer = TransDoDNetTrainer.__new__(TransDoDNetTrainer)  # attributes the two methods use, set by hand
    trainer.initial_lr, trainer.weight_decay, trainer.num_epochs = 2e-4, 1e-4, 1000
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None
    trainer.network, trainer.loss = _small(3, 3, coding=coding), DoDNetLoss(coding)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and len(trainer.optimizer.param_groups) == 1
    assert (group["initial_lr"], group["weight_decay"]) == (2e-4, 1e-4)
    assert group["lr"] == pytest.approx(2e-6)  # epoch 0 of the warm-up: 1% of the lr
    assert isinstance(trainer.lr_scheduler, WarmupPolyLRScheduler) and trainer.lr_scheduler.warmup == 10
    assert TransDoDNetTrainer.grad_clip == 0.1
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k:
                        norms.append(max_norm) or clip(params, max_norm, *a, **k))
    batch = {"data": torch.randn(2, 1, *PATCH), "target": torch.randint(0, 5, (2, 1, *PATCH)), "task_id": 1}
    before = [p.detach().clone() for p in trainer.network.parameters()]
    result = trainer.train_step(batch)
    assert norms == [0.1] and np.isfinite(result["loss"])
    assert trainer.network.current_task == 1 and trainer.loss.task == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.network.parameters()))


@pytest.mark.slow  # the universal_root fixture plans and preprocesses (~2 min on a busy 2-core machine)
def test_trainer_from_the_merged_plans(universal_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_EXT_NESTED_LABELS", "lesion:liver")
    trainer = load_trainer(universal_root, TransDoDNetTrainer, monkeypatch, tmp_path)
    assert trainer.enable_deep_supervision is False and trainer.grad_clip == 0.1
    assert (trainer.initial_lr, trainer.weight_decay, trainer.num_epochs) == (2e-4, 1e-4, 1000)
    inputs, heads = trainer.task_map.max_channels, trainer.label_manager.num_segmentation_heads
    network = TransDoDNetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                            inputs, heads, False)
    plan_strides = trainer.configuration_manager.network_arch_init_kwargs["strides"]
    assert isinstance(network, TransDoDNet) and network.strides == strides_from_plans(plan_strides)
    assert network.head_channels == 3 and network.num_tasks == len(trainer.task_map)
    network.decoder.deep_supervision = True  # nnU-Net's switch is accepted and changes nothing
    patch = tuple(trainer.configuration_manager.patch_size)
    network.set_task(1)
    assert tuple(network.train()(torch.randn(1, inputs, *patch)).shape) == (1, 3, *patch)
    assert network.encoder.axis_order == "corrected"
    # official weights need the official sampling order: the plans' arch_kwargs choose it
    trainer.configuration_manager.network_arch_init_kwargs["axis_order"] = "official"
    official = TransDoDNetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                             inputs, heads, False)
    assert official.encoder.axis_order == "official" and official.official_weights_problem() is None


@pytest.fixture(scope="module")
def transdodnet_model(universal_root):
    return train_stock(universal_root, TRAINER, NNUNET_EXT_NESTED_LABELS="lesion:liver")


@pytest.mark.slow
def test_stock_training_and_task_aware_prediction(universal_root, transdodnet_model, tmp_path):
    checkpoint = compat.read_checkpoint(transdodnet_model / "fold_0" / "checkpoint_final.pth")
    assert "query_decoder.query_embed.weight" in checkpoint["network_weights"]
    log = next((transdodnet_model / "fold_0").glob("training_log_*.txt")).read_text()
    assert "Pseudo dice per task:" in log
    assert (transdodnet_model / "fold_0" / "validation" / "summary_per_task.json").is_file()
    predict_task_and_check(universal_root, TRAINER, 1, tmp_path / "pred")  # liver + spleen + lesion: the nested task
