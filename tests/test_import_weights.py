"""Official weights: key maps of MC-Net+, LeFeD, DoDNet, TransDoDNet and CoTr against the official names
and shapes (tests/fixtures/official_keys, written down from the official code), and ``nnunet-ext
import-weights`` on checkpoints in each container the official repositories write, plus hostile files.

Checkpoints for the command are built from the fixtures with one expanded scalar per tensor (a
distinct value per official key, stride 0): full paper shapes, a few kB on disk, and every value
says which official tensor it came from. Networks are built on the meta device except where a
forward pass runs.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ext.architectures import paper_network
from nnunet_ext.official_weights import OFFICIAL_FORMATS, official_network
from nnunet_ext.registry import paper_networks
from nnunet_ext.testing.hostile import assert_refused, run_cli, snapshot

FIXTURES = Path(__file__).parent / "fixtures" / "official_keys"
FIXTURE_OF = {"UniSeg": "uniseg", "BANet": "banet", "MCNetPlus": "mcnet", "LeFeD": "lefed", "DoDNet": "dodnet",
              "TransDoDNet": "transdodnet", "CoTr": "cotr", "ClassSAM": "class_sam"}
# UniSeg, BA-Net: tests/test_conventions.py; ClassSAM's import (two files): tests/test_pretrained_finetune.py
NEW = ("MCNetPlus", "LeFeD", "DoDNet", "TransDoDNet", "CoTr", "ClassSAM")


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{FIXTURE_OF[name]}.json").read_text())


def expanded_official(name: str) -> OrderedDict:
    """Official names and shapes; tensor ``i`` is the value ``i`` (an int64 count for BN's counter)."""
    state = OrderedDict()
    for i, (key, shape) in enumerate(fixture(name)["keys"].items()):
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        state[key] = torch.tensor(i, dtype=dtype).expand(shape)
    return state


def random_official(name: str, seed: int = 0) -> OrderedDict:
    """Official names and shapes with small random values (BN variances positive, counters ints)."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in fixture(name)["keys"].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = 0.05 * torch.randn(shape, generator=generator)
    return state


# --- key maps against the official code (names, shapes, counts) -------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_official_names_and_shapes_match_the_official_code_one_to_one(name):
    facts = fixture(name)
    network = official_network(name)
    key_map = network.official_key_map()
    assert set(key_map) == set(network.state_dict())
    assert sorted(key_map.values()) == sorted(facts["keys"])  # one to one: no official key used twice
    assert {k: list(v.shape) for k, v in network.state_dict().items()} == \
        {ours: facts["keys"][official] for ours, official in key_map.items()}
    counted = sum(p.numel() for p in network.parameters())
    assert counted == facts["parameters"] == paper_networks()[name].official_parameters


@pytest.mark.parametrize("name", ["CoTr", "TransDoDNet"])
def test_official_weights_need_the_official_axis_order(name):
    with torch.device("meta"):
        corrected = paper_network(name, "default")
    with pytest.raises(ValueError, match="axis_order='official'"):
        corrected.official_key_map()


def test_mcnet_official_names_need_the_official_depth_and_decoder_order():
    from nnunet_ext.architectures.mcnet import MCNet

    with torch.device("meta"):
        shallow = MCNet(1, 2, strides=[[2, 2, 2]] * 3)
        swapped = MCNet(1, 2, upsampling=["trilinear", "transpose", "nearest"])
        vnet = MCNet(1, 2, num_decoders=1)
    with pytest.raises(ValueError, match="4 downsamplings"):
        shallow.official_key_map()
    with pytest.raises(ValueError, match="in this order"):
        swapped.official_key_map()
    assert {key.split(".")[0] for key in vnet.official_key_map().values()} == {"encoder", "decoder1"}  # official VNet


@pytest.mark.parametrize("name, shape", [("MCNetPlus", (1, 1, 16, 16, 16)), ("LeFeD", (1, 1, 16, 16, 16)),
                                         ("DoDNet", (1, 1, 16, 16, 16)), ("TransDoDNet", (1, 1, 32, 32, 32)),
                                         ("CoTr", (1, 1, 16, 16, 16))])
def test_an_official_state_dict_loads_strictly_round_trips_and_runs(name, shape):
    official = random_official(name)
    torch.manual_seed(0)
    network = paper_network(name, "official")
    network.load_state_dict(network.from_official_state_dict(official), strict=True)
    back = network.official_state_dict()
    assert list(back) == list(official) or set(back) == set(official)
    assert all(torch.equal(back[key], official[key]) for key in official)
    if hasattr(network, "set_task"):
        network.set_task(1)
    network.eval()
    with torch.no_grad():
        output = network(torch.randn(*shape))
    first = output[0] if isinstance(output, (list, tuple)) else output
    assert tuple(first.shape[2:]) == shape[2:] and bool(torch.isfinite(first).all())


# --- the command: each container format --------------------------------------------------------------

def v1_model(state: dict) -> dict:
    """What nnU-Net v1's NetworkTrainer.save_checkpoint writes (UniSeg, BA-Net, CoTr)."""
    return {"epoch": 1000, "state_dict": state,
            "optimizer_state_dict": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                     "param_groups": [{"lr": 1e-2, "momentum": 0.99, "nesterov": True, "params": [0]}]},
            "lr_scheduler_state_dict": None,
            "plot_stuff": ([np.float64(0.5), np.float64(0.4)], [np.float64(0.6)], [], [np.float32(0.8), np.int64(1)]),
            "best_stuff": (999, np.float64(0.31), np.float64(0.82)),
            "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 12}}


def prefixed(state: dict, prefix: str = "module.") -> dict:
    return OrderedDict((prefix + key, value) for key, value in state.items())


CONTAINERS = {
    "plain": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "optimizer": {"state": {}, "param_groups": []}, "epoch": 11},
    "v1_model": v1_model,
    "module_prefix": lambda s: prefixed(s),
}
# what each official training script writes (OFFICIAL_FORMATS): name -> (container, legacy serialisation)
OFFICIAL_CONTAINERS = {
    "MCNetPlus": (lambda s: s, False),
    "LeFeD": (lambda s: s, False),
    "DoDNet": (lambda s: {"model": prefixed(s), "optimizer": {"state": {}, "param_groups": []},
                          "amp": {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 37}}}, True),
    "TransDoDNet": (lambda s: {"state_dict": prefixed(s), "optimizer": {"state": {}, "param_groups": []},
                               "epoch": 1000, "amp": {"loss_scaler0": {"loss_scale": 512.0, "unskipped": 3}}}, False),
    "CoTr": (v1_model, False),
}


def assert_imported(name: str, official: dict, out: Path) -> None:
    saved = torch.load(out, map_location="cpu", weights_only=True)  # our output is safe to load
    weights = saved["network_weights"]
    network = official_network(name)
    network.load_state_dict(weights, strict=True, assign=True)
    key_map = network.official_key_map()
    assert all(torch.equal(weights[ours], official[theirs]) for ours, theirs in key_map.items())
    assert saved["nnunet_ext_import"]["network"] == name and saved["nnunet_ext_import"]["conventions"] == "official"


@pytest.mark.parametrize("container", sorted(CONTAINERS))
@pytest.mark.parametrize("name", ["UniSeg", "BANet"])
def test_import_each_container_format(tmp_path, name, container):
    official = expanded_official(name)
    checkpoint, out = tmp_path / "official.model", tmp_path / "weights" / "out.pth"
    torch.save(CONTAINERS[container](official), checkpoint)
    outcome = run_cli(["import-weights", name, str(checkpoint), "-o", str(out)])
    assert outcome.returncode == 0, outcome.output
    assert f"onto {name}" in outcome.stdout and "strict load OK" in outcome.stdout
    assert ("'module.'" in outcome.stdout) == (container == "module_prefix")
    assert_imported(name, official, out)


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONTAINERS))
def test_import_what_the_official_training_code_writes(tmp_path, name):
    official = expanded_official(name)
    container, legacy = OFFICIAL_CONTAINERS[name]
    checkpoint, out = tmp_path / "checkpoint.pth", tmp_path / "out.pth"
    torch.save(container(official), checkpoint, _use_new_zipfile_serialization=not legacy)
    outcome = run_cli(["import-weights", name, str(checkpoint), "-o", str(out), "-v"])
    assert outcome.returncode == 0, outcome.output
    assert f"Mapped {len(official)} official tensors" in outcome.stdout
    assert_imported(name, official, out)


# --- hostile input --------------------------------------------------------------------------------------

@pytest.fixture
def dodnet_checkpoint(tmp_path) -> tuple[Path, OrderedDict]:
    official = expanded_official("DoDNet")
    path = tmp_path / "MOTS_DynConv_e1000.pth"
    torch.save(official, path)
    return path, official


def refused(tmp_path, argv, needles, inputs) -> None:
    out = tmp_path / "out.pth"
    before = snapshot(*inputs)
    outcome = run_cli(["import-weights", *argv, "-o", str(out)])
    assert_refused(outcome, needles, before=before, after=snapshot(*inputs), absent=[out], clean=[tmp_path])
    assert len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr


def test_wrong_method_is_named(tmp_path):
    checkpoint = tmp_path / "banet.model"
    torch.save(v1_model(expanded_official("BANet")), checkpoint)
    refused(tmp_path, ["UniSeg", str(checkpoint)], ["holds BANet weights, not UniSeg's", "import-weights BANet"],
            [checkpoint])
    lefed = tmp_path / "lefed.pth"
    torch.save(expanded_official("LeFeD"), lefed)
    refused(tmp_path, ["MCNetPlus", str(lefed)], ["holds LeFeD weights, not MCNetPlus"], [lefed])
    # a 2-decoder MC-Net file: a subset of MC-Net+'s names and of LeFeD's, the method of neither
    two_decoders = tmp_path / "mcnet3d_v1_best_model.pth"
    torch.save(OrderedDict((k, v) for k, v in expanded_official("MCNetPlus").items() if not k.startswith("decoder3.")),
               two_decoders)
    refused(tmp_path, ["MCNetPlus", str(two_decoders)], ["not an official MCNetPlus checkpoint", "missing: decoder3."],
            [two_decoders])
    unrelated = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(2), "head.weight": torch.zeros(3)}, unrelated)
    refused(tmp_path, ["CoTr", str(unrelated)], ["only 0% of the names agree with CoTr's"], [unrelated])


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, dodnet_checkpoint):
    _, official = dodnet_checkpoint
    broken = OrderedDict(official)
    del broken["controller.weight"]
    broken["layer1.0.conv1.weight"] = torch.zeros(64, 32, 3, 3)
    broken["aux_head.weight"] = torch.zeros(2)
    checkpoint = tmp_path / "broken.pth"
    torch.save(broken, checkpoint)
    refused(tmp_path, ["DoDNet", str(checkpoint)],
            ["not an official DoDNet checkpoint", "missing: controller.weight", "unexpected: aux_head.weight",
             "mis-shaped: layer1.0.conv1.weight (64, 32, 3, 3) (expected (64, 32, 3, 3, 3))"], [checkpoint])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_and_corrupt_files_are_refused(tmp_path, dodnet_checkpoint, damage):
    path, _ = dodnet_checkpoint
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    refused(tmp_path, ["DoDNet", str(path)], ["cannot read", "truncated or not a PyTorch checkpoint"], [path])


def test_nan_weights_and_integer_weights_are_refused(tmp_path, dodnet_checkpoint):
    _, official = dodnet_checkpoint
    nan = OrderedDict(official, **{"conv1.weight": torch.full((32, 1, 3, 3, 3), float("nan"))})
    integer = OrderedDict(official, **{"GAP.0.weight": torch.ones(256, dtype=torch.long)})
    for state, needle in ((nan, "NaN or infinite values in conv1.weight"), (integer, "GAP.0.weight")):
        checkpoint = tmp_path / "bad.pth"
        torch.save(state, checkpoint)
        refused(tmp_path, ["DoDNet", str(checkpoint)], [needle], [checkpoint])


class _Payload:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_a_malicious_pickle_is_never_run(tmp_path, dodnet_checkpoint, how):
    _, official = dodnet_checkpoint
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    payload = {"state_dict": official, "epoch": _Payload(marker)}
    if how == "torch_save":
        torch.save(payload, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    refused(tmp_path, ["DoDNet", str(checkpoint)], ["system", "not on the allow-list", "nothing in it was run"],
            [checkpoint])
    assert not marker.exists()


def test_a_type_outside_the_allow_list_is_named(tmp_path, dodnet_checkpoint):
    _, official = dodnet_checkpoint
    checkpoint = tmp_path / "with_args.pth"
    torch.save({"state_dict": official, "args": argparse.Namespace(lr=0.01)}, checkpoint)
    refused(tmp_path, ["DoDNet", str(checkpoint)], ["argparse.Namespace", "allow-list"], [checkpoint])


def test_existing_output_is_kept_unless_forced(tmp_path, dodnet_checkpoint):
    path, official = dodnet_checkpoint
    out = tmp_path / "out.pth"
    out.write_bytes(b"previous")
    before = snapshot(path, out)
    outcome = run_cli(["import-weights", "DoDNet", str(path), "-o", str(out)])
    assert_refused(outcome, ["exists", "--force"], before=before, after=snapshot(path, out), clean=[tmp_path])
    outcome = run_cli(["import-weights", "DoDNet", str(path), "-o", str(out), "--force"])
    assert outcome.returncode == 0, outcome.output
    assert_imported("DoDNet", official, out)
    outcome = run_cli(["import-weights", "DoDNet", str(path), "-o", str(path), "--force"])
    assert_refused(outcome, ["is the checkpoint being imported"])


def test_other_refusals(tmp_path, dodnet_checkpoint):
    path, _ = dodnet_checkpoint
    refused(tmp_path, ["ClassSAM", str(path)], ["holds DoDNet weights, not SurgicalSAM's", "import-weights DoDNet"],
            [path])
    refused(tmp_path, ["DoDnet", str(path)], ["Unknown network 'DoDnet'", "DoDNet"], [path])
    refused(tmp_path, ["DoDNet", str(tmp_path / "absent.pth")], ["does not exist"], [path])
    v2 = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"stem.weight": torch.zeros(1)}, "trainer_name": "DoDNetTrainer"}, v2)
    refused(tmp_path, ["DoDNet", str(v2)], ["already an nnU-Net v2 checkpoint"], [path, v2])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    outcome = run_cli(["import-weights", "DoDNet", str(path), "-o", str(blocker / "out.pth")])
    assert_refused(outcome, ["cannot write", "nothing was written"], clean=[tmp_path])
    nothing = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "note": "no weights"}, nothing)
    refused(tmp_path, ["DoDNet", str(nothing)], ["holds no state dict", "'epoch'"], [path, nothing])


def test_every_importable_network_has_a_fixture_and_a_documented_format():
    assert set(OFFICIAL_FORMATS) == set(FIXTURE_OF)
    assert all(entry.repository.startswith("github.com/") for entry in OFFICIAL_FORMATS.values())


# --- nnU-Net's -pretrained_weights loader on the imported file ---------------------------------------------

def test_nnunet_pretrained_weights_loader_takes_the_imported_uniseg(tmp_path):
    """What ``nnUNetv2_train ... -pretrained_weights OUT`` does with the file (nnU-Net's own loader):
    every key of a network built like the checkpoint's is transferred except the 1x1 heads
    (``.seg_layers.``, always re-initialised, so any label count works); anything else that is
    missing or differs in shape stops it with an error naming the key (docs/methods/uniseg.md)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunet_ext.architectures.uniseg import UNISEG_TASK_CHANNELS, UniSeg

    official = expanded_official("UniSeg")
    checkpoint, out = tmp_path / "model_final_checkpoint.model", tmp_path / "uniseg.pth"
    torch.save(v1_model(official), checkpoint)
    assert run_cli(["import-weights", "UniSeg", str(checkpoint), "-o", str(out)]).returncode == 0

    def uniseg(**changes) -> UniSeg:
        """paper_uniseg's arguments (the official 11-task network) with ``changes``."""
        arguments = dict(input_channels=4, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320],
                         conv_op=nn.Conv3d, kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5,
                         strides=[[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * 4, n_conv_per_stage=[2] * 6, num_classes=4,
                         n_conv_per_stage_decoder=[2] * 5, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"negative_slope": 1e-2, "inplace": True}, deep_supervision=True,
                         patch_size=[64, 192, 192], task_channels=list(UNISEG_TASK_CHANNELS), conventions="official")
        arguments.update(changes)
        with torch.device("meta"):
            return UniSeg(**arguments)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, which is all this test needs
        load_pretrained_weights(uniseg(), str(out))  # the paper network
        load_pretrained_weights(uniseg(num_classes=7), str(out))  # another label count: heads skipped
        with pytest.raises(AssertionError, match="key prompt is not the same"):  # another number of tasks
            load_pretrained_weights(uniseg(task_channels=[1, 1, 4]), str(out))
        with pytest.raises(AssertionError, match=r"key decoder\.stages\.4\.convs\.0\.conv\.weight is not the same"):
            load_pretrained_weights(uniseg(conventions="default"), str(out))  # plans without "conventions"
