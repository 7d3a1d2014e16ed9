"""UniSeg network: task-specific input convs, prompt + FUSE, decoder, masking, paper configuration."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_ext.architectures.uniseg import (UNISEG_TASK_CHANNELS, UNISEG_TASK_CLASSES, UniSeg, paper_uniseg)
from nnunet_ext.tasks.conditioning import TaskNotSetError, is_masked

PAPER_PARAMETERS = 32_114_381  # counted from the official nnU-Net v1 model

# Small anisotropic 3D plan with an odd patch: stage 0 does not pool, stage 1 pools in-plane only.
SMALL_3D = dict(n_stages=4, features_per_stage=[4, 8, 16, 16], conv_op=nn.Conv3d,
                kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2, 2],
                n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})
ODD_PATCH = [40, 112, 96]  # bottleneck 10x14x12
TINY_PATCH = [8, 24, 16]  # bottleneck 2x3x2, for the fast behavioural tests
TASK_CHANNELS = [1, 2, 1, 4]  # two single-channel tasks: they differ only through the prompt
NUM_CLASSES = 3


def make_net(patch=TINY_PATCH, task_channels=TASK_CHANNELS, deep_supervision=True, annotated_classes=None,
             seed=0, **overrides) -> UniSeg:
    torch.manual_seed(seed)
    kwargs = dict(SMALL_3D, **overrides)
    net = UniSeg(input_channels=max(task_channels), num_classes=NUM_CLASSES, deep_supervision=deep_supervision,
                 patch_size=patch, task_channels=task_channels, annotated_classes=annotated_classes, **kwargs)
    net.apply(UniSeg.initialize)
    return net


def make_input(patch=TINY_PATCH, batch=2, channels=max(TASK_CHANNELS), seed=1) -> torch.Tensor:
    return torch.randn(batch, channels, *patch, generator=torch.Generator().manual_seed(seed))


def random_weighted_loss(outputs) -> torch.Tensor:
    """Random weights, not a plain sum: a sum of instance-normalised features has (almost) no gradient."""
    g = torch.Generator().manual_seed(2)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def test_deep_supervision_shapes_for_an_anisotropic_odd_patch_and_every_channel_count():
    net = make_net(patch=ODD_PATCH, task_channels=[1, 2, 4])
    assert net.bottleneck_size == (10, 14, 12) and tuple(net.prompt.shape) == (1, 3, 10, 14, 12)
    x = make_input(ODD_PATCH, batch=1, channels=4)
    expected = [(1, NUM_CLASSES, 40, 112, 96), (1, NUM_CLASSES, 40, 56, 48), (1, NUM_CLASSES, 20, 28, 24)]
    with torch.no_grad():
        for task in range(3):
            net.set_task(task)
            outputs = net(x)
            assert isinstance(outputs, list) and [tuple(o.shape) for o in outputs] == expected


def test_without_deep_supervision_one_full_resolution_tensor_equal_to_the_first_deep_supervision_output():
    net = make_net()
    net.set_task(1)
    x = make_input()
    with torch.no_grad():
        with_ds = net(x)
        net.decoder.deep_supervision = False  # what nnU-Net's predictor does
        single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (2, NUM_CLASSES, *TINY_PATCH)
    assert torch.equal(single, with_ds[0])
    built_without = make_net(deep_supervision=False)
    built_without.set_task(0)
    with torch.no_grad():
        assert isinstance(built_without(x), torch.Tensor)


def test_2d_plan():
    net = UniSeg(input_channels=2, n_stages=3, features_per_stage=[4, 8, 8], conv_op=nn.Conv2d, kernel_sizes=3,
                 strides=[1, 2, 2], n_conv_per_stage=2, num_classes=2, n_conv_per_stage_decoder=1, conv_bias=True,
                 norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                 deep_supervision=True, patch_size=[20, 12], task_channels=[2, 1])
    assert tuple(net.prompt.shape) == (1, 2, 5, 3)
    net.set_task(1)
    with torch.no_grad():
        outputs = net(torch.randn(2, 2, 20, 12))
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 20, 12), (2, 2, 10, 6)]


# ---------------------------------------------------------------------------------------------
# input channels and input convs
# ---------------------------------------------------------------------------------------------
def test_one_input_conv_per_distinct_channel_count_and_no_unused_first_conv():
    net = make_net()
    assert sorted(net.input_convs) == ["1", "2", "4"]
    for key, conv in net.input_convs.items():
        assert conv.in_channels == int(key) and conv.out_channels == 4 and conv.kernel_size == (1, 3, 3)
    # the encoder's own (max-channel) first conv is gone, so no parameter goes unused
    first_block = net.encoder.stages[0][-1].convs[0]
    assert not any(isinstance(m, nn.Conv3d) for m in first_block.modules())
    assert isinstance(first_block.all_modules[1], nn.InstanceNorm3d)  # the shared norm and nonlin stay


@pytest.mark.parametrize("task", range(len(TASK_CHANNELS)))
def test_output_ignores_the_padded_channels_beyond_the_tasks_count(task):
    net = make_net()
    net.set_task(task)
    n = TASK_CHANNELS[task]
    x = make_input()
    changed_padding = x.clone()
    changed_padding[:, n:] = torch.randn_like(changed_padding[:, n:]) * 5
    changed_used = x.clone()
    changed_used[:, n - 1] += 1.0
    with torch.no_grad():
        reference = net(x)[0]
        assert torch.equal(net(changed_padding)[0], reference)
        assert not torch.allclose(net(changed_used)[0], reference)  # the task's own last channel is read


@pytest.mark.parametrize("task", range(len(TASK_CHANNELS)))
def test_gradient_reaches_only_the_tasks_input_conv(task):
    net = make_net()
    net.set_task(task)
    random_weighted_loss(net(make_input())).backward()
    used = str(TASK_CHANNELS[task])
    for key, conv in net.input_convs.items():
        if key == used:
            assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        else:  # in the graph for DDP (every parameter used each step) but with zero gradient
            assert torch.all(conv.weight.grad == 0) and torch.all(conv.bias.grad == 0), key


def test_wrong_input_channel_count_is_refused():
    net = make_net()
    net.set_task(0)
    with pytest.raises(ValueError, match="expects the merged dataset's 4 input channels"):
        net(make_input(channels=1))


# ---------------------------------------------------------------------------------------------
# prompt and FUSE
# ---------------------------------------------------------------------------------------------
def test_fuse_channels_and_decoder_input():
    net = make_net()
    convs = [block.conv for block in net.fuse.convs]
    n_tasks, c_b = len(TASK_CHANNELS), SMALL_3D["features_per_stage"][-1]
    hidden = (c_b + n_tasks) // 4
    assert [(c.in_channels, c.out_channels) for c in convs] == [(c_b + n_tasks, hidden), (hidden, hidden),
                                                                (hidden, n_tasks)]
    assert all(c.kernel_size == (3, 3, 3) for c in convs)
    assert net.decoder.transpconvs[0].in_channels == c_b + 1


@pytest.mark.parametrize("task", [0, 3])
def test_decoder_receives_the_bottleneck_and_the_current_tasks_fuse_channel(task):
    net = make_net()
    net.set_task(task)
    captured = {}
    hooks = [net.encoder.register_forward_hook(lambda m, i, o: captured.update(bottleneck=o[-1].clone())),
             net.fuse.register_forward_hook(lambda m, i, o: captured.update(fuse_in=i[0].clone(), fuse=o.clone())),
             net.decoder.transpconvs[0].register_forward_pre_hook(lambda m, i: captured.update(dec=i[0].clone()))]
    with torch.no_grad():
        net(make_input())
    for hook in hooks:
        hook.remove()
    c_b = captured["bottleneck"].shape[1]
    assert torch.equal(captured["fuse_in"][:, :c_b], captured["bottleneck"])
    assert torch.equal(captured["fuse_in"][:, c_b:], net.prompt.detach().expand(2, -1, -1, -1, -1))
    assert torch.equal(captured["dec"][:, :c_b], captured["bottleneck"])
    assert torch.equal(captured["dec"][:, c_b:], captured["fuse"][:, task:task + 1])


def test_prompt_and_fuse_get_gradients_and_only_the_tasks_last_fuse_filter_does():
    net = make_net()
    net.set_task(2)
    random_weighted_loss(net(make_input())).backward()
    assert net.prompt.grad is not None and net.prompt.grad.abs().sum() > 0
    for block in net.fuse.convs:
        assert block.conv.weight.grad.abs().sum() > 0
    last = net.fuse.convs[-1].conv.weight.grad.flatten(1).abs().sum(1)
    assert last[2] > 0 and torch.count_nonzero(last) == 1  # the other tasks' prompt channels are not used


def test_tasks_with_the_same_channel_count_give_different_outputs():
    net = make_net()  # tasks 0 and 2 both read one channel with the same input conv: only the prompt differs
    x = make_input()
    with torch.no_grad():
        net.set_task(0)
        first = net(x)[0]
        net.set_task(2)
        third = net(x)[0]
    assert not torch.allclose(first, third)


# ---------------------------------------------------------------------------------------------
# task conditioning
# ---------------------------------------------------------------------------------------------
def test_eval_mode_masks_unannotated_classes_in_every_output_and_train_mode_does_not():
    annotated = [[True, True, False], [True, False, True], [True, True, True], [True, False, False]]
    net = make_net(annotated_classes=annotated)
    x = make_input()
    for task, row in enumerate(annotated):
        net.set_task(task)
        net.eval()
        with torch.no_grad():
            outputs = net(x)
        keep = torch.tensor(row)
        for output in outputs:
            masked = is_masked(output, keep)
            for c, is_annotated in enumerate(row):
                if is_annotated:
                    assert not masked[:, c].any()
                else:
                    assert masked[:, c].all()
        net.train()
        with torch.no_grad():
            assert not any(is_masked(o, keep).any() for o in net(x))


def test_forward_without_a_task_names_the_predict_command():
    net = make_net()
    with pytest.raises(TaskNotSetError, match="nnunet-ext predict --task"):
        net(make_input())


@pytest.mark.parametrize("task", [-1, len(TASK_CHANNELS)])
def test_set_task_out_of_range_raises(task):
    with pytest.raises(ValueError, match="out of range"):
        make_net().set_task(task)


def test_state_dict_has_no_task_buffers_and_no_second_encoder_copy_and_loads_without_deep_supervision():
    net = make_net()
    keys = set(net.state_dict())
    assert not {"task_index", "annotated_classes"} & keys
    assert not any(k.startswith("decoder.encoder") for k in keys)
    assert {"prompt", "input_convs.1.weight", "input_convs.2.weight", "input_convs.4.weight"} <= keys
    inference = make_net(deep_supervision=False, seed=5)
    inference.load_state_dict(net.state_dict())  # strict: same keys with and without deep supervision
    x = make_input()
    net.set_task(3)
    inference.set_task(3)
    with torch.no_grad():
        assert torch.equal(inference(x), net(x)[0])


# ---------------------------------------------------------------------------------------------
# construction, nnU-Net hooks
# ---------------------------------------------------------------------------------------------
def test_constructor_rejects_inconsistent_channels_and_patch():
    with pytest.raises(ValueError, match="max\\(task_channels\\) = 4"):
        UniSeg(input_channels=2, num_classes=2, patch_size=TINY_PATCH, task_channels=[1, 4], **SMALL_3D)
    with pytest.raises(ValueError, match="not divisible by the cumulative stride"):
        make_net(patch=[8, 24, 20])


def test_initialize_is_he_init_and_keeps_the_prompt():
    net = make_net()
    prompt = net.prompt.detach().clone()
    for p in net.parameters():
        nn.init.constant_(p, 0.5)
    net.prompt.data.copy_(prompt)
    net.apply(UniSeg.initialize)
    assert torch.equal(net.prompt.detach(), prompt)
    assert torch.all(net.input_convs["2"].bias == 0) and torch.all(net.decoder.transpconvs[0].bias == 0)
    assert net.fuse.convs[0].conv.weight.std() != 0 and torch.all(net.fuse.convs[0].norm.weight == 0.5)


def test_feature_map_size_is_plain_unet_plus_the_fuse_maps():
    net = make_net(patch=ODD_PATCH)
    plain = PlainConvUNet(input_channels=4, num_classes=NUM_CLASSES, deep_supervision=True, **SMALL_3D)
    fuse_maps = sum(block.conv.out_channels for block in net.fuse.convs) * int(np.prod(net.bottleneck_size))
    assert net.compute_conv_feature_map_size(ODD_PATCH) == plain.compute_conv_feature_map_size(ODD_PATCH) + fuse_maps


# ---------------------------------------------------------------------------------------------
# paper configuration
# ---------------------------------------------------------------------------------------------
def test_paper_configuration_size_and_structure():
    net = paper_uniseg()
    assert UNISEG_TASK_CHANNELS == (1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 2)  # BraTS21 4 channels, AutoPET CT+PET 2
    assert sorted(net.input_convs) == ["1", "2", "4"] and net.input_channels == 4
    assert tuple(net.prompt.shape) == (1, 11, 4, 6, 6) and net.prompt.numel() == 1_584
    fuse = sum(p.numel() for p in net.fuse.parameters())
    assert abs(fuse - 940_000) <= 0.01 * 940_000, fuse
    assert [(b.conv.in_channels, b.conv.out_channels) for b in net.fuse.convs] == [(331, 82), (82, 82), (82, 11)]
    assert net.decoder.transpconvs[0].in_channels == 321
    assert net.annotated_classes.sum(1).tolist() == list(UNISEG_TASK_CLASSES)
    counted = sum(p.numel() for p in net.parameters())
    # nnU-Net v2 vs the official v1 Generic_UNet: the last decoder stage uses its skip's [1,3,3]
    # kernel (v1: the 3x3x3 of the stage below, 64*32*18 + 32*32*18 weights more), and transposed
    # convs and heads have biases (v1: none; 320+256+128+64+32 and 5*4).
    v1_kernel_quirk = (64 * 32 + 32 * 32) * (27 - 9)
    v2_biases = (320 + 256 + 128 + 64 + 32) + 5 * 4
    assert counted == PAPER_PARAMETERS - v1_kernel_quirk + v2_biases == 32_059_905
    with torch.device("meta"):
        official = paper_uniseg(conventions="official")  # v1's kernel and no biases: the official network
    assert sum(p.numel() for p in official.parameters()) == PAPER_PARAMETERS
