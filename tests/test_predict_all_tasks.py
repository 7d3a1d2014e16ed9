"""``nnunet-ext predict --task all`` / ``--task A,B``: every task from one pass of the shared network.

Three levels, cheapest first:

* networks (tiny, random weights): :class:`AllTasksNetwork`'s blocks equal ``set_task(t); network(x)``
  exactly on the classes each task annotates (the others, left out, never win the argmax), the
  shared part runs once (per channel count for UniSeg), the task set before is kept;
* nnU-Net's predictor (random-weight model folders of every universal trainer, two folds, mirroring):
  the stacked sliding-window logits equal the per-task ones exactly;
* the command (slow; nnU-Net's preprocessing and export run in spawned processes): ``--task all
  --combine --save_probabilities`` with two folds and mirroring on every axis writes per task the same
  files (label maps, probabilities, dataset.json, plans.json) as ``--task T`` runs, and the combined
  map follows the documented rule. The cheap version of that check, with ``-num_parts`` too, and the
  comparison of one task with nnU-Net's own route: tests/test_predict_parity.py.

Model folders: :func:`predict_support.random_weight_model` (random weights, two folds, built once
per session from the merged synthetic family's plans).
Bad input and the ``--combine`` rule on crafted overlaps: tests/test_hostile_merge_predict.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ext.tasks.all_tasks import AllTasksNetwork, combine_segmentations
from nnunet_ext.tasks.task_map import TaskMap
from predict_support import outputs, random_weight_model

TRAINERS = ["nnUNetUniversalTrainer", "UniSegTrainer", "DoDNetTrainer", "TransDoDNetTrainer"]


# --- networks ---------------------------------------------------------------------------------------


def _uniseg():
    from nnunet_ext.architectures.uniseg import UniSeg

    torch.manual_seed(0)
    network = UniSeg(input_channels=4, n_stages=3, features_per_stage=[4, 8, 8], conv_op=nn.Conv3d, kernel_sizes=3,
                     strides=[1, 2, 2], n_conv_per_stage=1, num_classes=4, n_conv_per_stage_decoder=1, conv_bias=True,
                     norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                     nonlin_kwargs={"inplace": True}, patch_size=[8, 8, 8], task_channels=[1, 4, 1, 2],
                     annotated_classes=[[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 1]])
    network.apply(UniSeg.initialize)
    return network, network.encoder, (4, 8, 8, 8), 4


def _coding():
    from nnunet_ext.architectures.dodnet import SigmoidLabelCoding

    def task(name, task_id, labels):
        labels = {"background": 0, **labels}
        return {name: {"task_id": task_id, "source": f"Dataset9{task_id}_{name}", "case_prefix": f"T{task_id}{name}_",
                       "num_channels": 1, "channel_names": {"0": "CT"}, "labels": labels,
                       "to_source": {str(v): i for i, v in enumerate(labels.values())}}}

    task_map = TaskMap.from_dict({**task("Liver", 0, {"liver": 1, "tumour": 2}), **task("Colon", 1, {"tumour": 2}),
                                  **task("Spleen", 2, {"spleen": 3})})
    return SigmoidLabelCoding(task_map, {"tumour": "liver"})


def _dodnet():
    from nnunet_ext.architectures.dodnet import DoDNet

    torch.manual_seed(0)
    coding = _coding()
    network = DoDNet(1, 3, coding.head_channels, coding=coding, features=(16, 16, 16), blocks=(1, 1, 1),
                     strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    return network, network.stem, (1, 8, 8, 8), 3


def _transdodnet():
    from nnunet_ext.architectures.transdodnet import TransDoDNet

    torch.manual_seed(0)
    coding = _coding()
    network = TransDoDNet(1, 3, coding.head_channels, coding=coding, blocks=(1, 1), widths=(4, 4), stem_channels=8,
                          expansion=2, decoder_channels=(8, 8), hidden=12, heads=2, ffn=16, encoder_layers=1,
                          decoder_layers=1, points=2, levels=2, strides=[[1, 2, 2], [2, 2, 2], [1, 2, 2]])
    return network, network.backbone, (1, 8, 16, 16), 3


def _universal():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_ext.trainers.universal import TaskConditionedNetwork

    torch.manual_seed(0)
    inner = PlainConvUNet(2, 3, [4, 8, 8], nn.Conv3d, 3, [1, 2, 2], 1, 4, 1, norm_op=nn.InstanceNorm3d,
                          nonlin=nn.LeakyReLU)
    network = TaskConditionedNetwork(inner, 3, [[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 0]], 4)
    return network, inner, (2, 8, 8, 8), 3


NETWORKS = {"UniSeg": _uniseg, "DoDNet": _dodnet, "TransDoDNet": _transdodnet, "universal": _universal}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_stacked_outputs_equal_single_task_outputs_with_the_shared_part_run_once(name: str) -> None:
    network, shared, shape, num_tasks = NETWORKS[name]()
    network.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    order = list(reversed(range(num_tasks)))  # any order, any subset
    calls = []
    shared.register_forward_hook(lambda *args: calls.append(1))
    network.set_task(1)
    with torch.inference_mode():
        stacked = AllTasksNetwork(network, order)(x)
        runs = len(calls)
        single = {}
        for task in order:
            network.set_task(task)
            single[task] = network(x)
    wrapper = AllTasksNetwork(network, order)
    offsets = np.cumsum([0, *wrapper.block_channels])
    assert stacked.shape[1] == offsets[-1] < single[0].shape[1] * num_tasks  # only the annotated classes
    for block, task in enumerate(order):
        classes = wrapper.classes[block]
        assert classes == network.annotated_classes[task].nonzero().flatten().tolist()
        assert torch.equal(stacked[:, offsets[block]:offsets[block + 1]], single[task][:, classes]), task
        # the classes left out are masked: the argmax over the block is the argmax over all classes
        chosen = torch.tensor(classes)[stacked[:, offsets[block]:offsets[block + 1]].argmax(1)]
        assert torch.equal(chosen, single[task].argmax(1)), task
    distinct_stems = len({1, 4, 2}) if name == "UniSeg" else 1  # UniSeg: one input conv per channel count
    assert runs == distinct_stems
    network.set_task(1)
    with torch.inference_mode():
        AllTasksNetwork(network, [0])(x)
        assert torch.equal(network(x), single[1])  # the task set before is kept


def test_every_class_is_stacked_when_asked() -> None:
    network, _, shape, num_tasks = _universal()
    network.eval()
    stacked = AllTasksNetwork(network, range(num_tasks), annotated_only=False)
    assert stacked.block_channels == [4] * num_tasks
    x = torch.randn(1, *shape)
    network.set_task(2)
    with torch.inference_mode():
        assert torch.equal(stacked(x)[:, 8:], network(x))


def test_stacked_network_loads_the_wrapped_networks_state_dict() -> None:
    network, *_ = _dodnet()
    stacked = AllTasksNetwork(network, [0, 1])
    other, *_ = _dodnet()
    with torch.no_grad():
        next(other.parameters()).add_(1)
    stacked.load_state_dict(other.state_dict())
    assert torch.equal(next(network.parameters()), next(other.parameters()))


def test_combine_gives_each_voxel_the_first_tasks_foreground_label() -> None:
    first = np.array([0, 1, 1, 0, 0])
    second = np.array([0, 3, 0, 3, 0])
    third = np.array([2, 2, 2, 2, 0])
    assert combine_segmentations([first, second, third]).tolist() == [2, 1, 1, 3, 0]
    assert combine_segmentations([third, second, first]).tolist() == [2, 2, 2, 2, 0]


# --- model folders of every universal trainer (random weights) --------------------------------------


@pytest.fixture
def model(universal_root, tmp_path_factory, request) -> Path:
    """A random-weight model folder of the trainer ``request.param`` on the session's merged family."""
    return random_weight_model(universal_root, request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("model", [t if t in ("nnUNetUniversalTrainer", "UniSegTrainer")
                                   else pytest.param(t, marks=pytest.mark.slow) for t in TRAINERS], indirect=True)
def test_stacked_sliding_window_logits_equal_per_task_logits(model: Path) -> None:
    """nnU-Net's predictor: two folds, Gaussian weighting, mirroring (one axis here, every axis in the
    command tests), two overlapping windows."""
    from nnunet_ext import compat
    from nnunet_ext.tasks.predict import task_conditioned_network

    task_map = TaskMap.from_dataset_json(model / "dataset.json")
    predictor = compat.predictor(0.5, True, torch.device("cpu"))
    predictor.allow_tqdm = False
    predictor.initialize_from_trained_model_folder(str(model), (0, 1))
    predictor.allowed_mirroring_axes = (2,)
    patch = predictor.configuration_manager.patch_size
    data = torch.randn(task_map.max_channels, patch[0], patch[1], patch[2] + 4,  # two windows along x
                       generator=torch.Generator().manual_seed(3))
    network = task_conditioned_network(predictor, model)
    stacked_network = AllTasksNetwork(network, [2, 0, 1])
    offsets = np.cumsum([0, *stacked_network.block_channels])
    with compat.stacked_predictor(predictor, stacked_network, offsets[-1]):
        stacked = predictor.predict_logits_from_preprocessed_data(data)
    for block, (task, classes) in enumerate(zip(stacked_network.task_ids, stacked_network.classes)):
        network.set_task(task)
        single = predictor.predict_logits_from_preprocessed_data(data)
        assert torch.equal(stacked[offsets[block]:offsets[block + 1]], single[classes]), task_map.task(task).name


# --- the command ------------------------------------------------------------------------------------


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow
@pytest.mark.parametrize("model", TRAINERS, indirect=True)
def test_all_tasks_command_writes_what_single_task_runs_write(universal_root, model: Path, tmp_path: Path) -> None:
    from nnunet_ext.datasets.multi_dataset import DEFAULT_DATASET_IDS
    from nnunet_ext.testing.hostile import run_cli, snapshot, temporaries

    task_map = TaskMap.from_dataset_json(model / "dataset.json")
    source = next(universal_root.raw.glob(f"Dataset{DEFAULT_DATASET_IDS[2]:03d}_*"))  # 4 channels: every task's
    images = tmp_path / "images"
    shutil.copytree(source / "imagesTs", images)
    before = snapshot(images)
    common = ["-i", str(images), "-m", str(model), "-f", "0", "1", "-device", "cpu", "-npp", "1", "-nps", "1",
              "--save_probabilities"]
    out = tmp_path / "all"
    outcome = run_cli(["predict", "--task", "all", "--combine", "-o", str(out), *common])
    assert outcome.returncode == 0, outcome.output
    assert sorted(p.name for p in out.iterdir()) == sorted([*task_map.names, "combined"])
    merged_maps = []
    for task in task_map:
        single = tmp_path / task.name
        result = run_cli(["predict", "--task", task.name, "-o", str(single), *common])
        assert result.returncode == 0, result.output
        assert outputs(out / task.name) == outputs(single), task.name  # same maps, probabilities, dataset.json
        from_source = {s: m for m, s in task.to_source.items()}
        merged_maps.append(np.vectorize(from_source.get)(_read(single / "synth_004.nii.gz")))
    combined = _read(out / "combined" / "synth_004.nii.gz")
    assert np.array_equal(combined, combine_segmentations(merged_maps))
    assert len(np.unique(combined)) > 1
    assert snapshot(images) == before and not temporaries(tmp_path)
