"""Official weights in use: ``-pretrained_weights`` with our heads (nnunet_ext.pretrained), ClassSAM's
two-file import (SurgicalSAM + SAM), SurgicalSAM's preprocessing, and model folders built from
imported weights for ``nnUNetv2_predict`` / ``nnunet-ext predict --task``.

Official-format checkpoints are built from tests/fixtures/official_keys (official names and shapes,
random values) and imported with ``nnunet-ext import-weights``. The default tests run nnU-Net's own
``maybe_load_checkpoint`` in-process (what ``nnUNetv2_train -pretrained_weights`` runs before the
first step); the stock commands themselves are slow-marked.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ext.errors import UserFacingError
from nnunet_ext.pretrained import HEADS, IMPORT_KEY, head_patterns, is_head, read_weights
from nnunet_ext.testing.harness import load_trainer, run_stock
from nnunet_ext.testing.hostile import assert_refused, run_cli, snapshot

FIXTURES = Path(__file__).parent / "fixtures" / "official_keys"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def random_official(name: str, seed: int = 0) -> OrderedDict:
    """Official names and shapes (the fixture), small random values; BN variances positive, counters ints."""
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


def expanded_official(name: str) -> OrderedDict:
    """Official names and shapes; tensor ``i`` holds the value ``i`` everywhere (stride 0: a few kB on disk),
    so every loaded tensor says which official tensor it came from."""
    state = OrderedDict()
    for i, (key, shape) in enumerate(fixture(name)["keys"].items()):
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        state[key] = torch.tensor(i, dtype=dtype).expand(shape)
    return state


def routed_loader():
    """What nnUNetv2_train calls for -pretrained_weights once a trainer module is imported."""
    import nnunetv2.run.run_training as run_training

    import nnunet_ext.trainers.base  # noqa: F401  (installs the route)

    return run_training.load_pretrained_weights


# --- which tensors are the head ------------------------------------------------------------------------

def _uniseg(num_classes: int, tasks: int):
    from nnunet_ext.architectures.uniseg import UniSeg

    return UniSeg(input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op=nn.Conv3d,
                  kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_conv_per_stage=[2] * 4,
                  num_classes=num_classes, n_conv_per_stage_decoder=[2] * 3, conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                  deep_supervision=True, patch_size=[32, 32, 32], task_channels=[1] * tasks, conventions="official")


def _banet(num_classes: int, tasks: int):
    from nnunet_ext.architectures.banet import BANet, nnunet_default_topology_3d

    return BANet(1, num_classes=num_classes, conventions="official", **nnunet_default_topology_3d((32,) * 3))


def _class_sam(num_classes: int, tasks: int):
    from nnunet_ext.architectures.class_sam import ClassSAM

    return ClassSAM(3, num_classes + 1, sam_model_type="tiny")


def _variants():
    from nnunet_ext.architectures.cotr import CoTr
    from nnunet_ext.architectures.dodnet import DoDNet
    from nnunet_ext.architectures.lefed import LeFeD
    from nnunet_ext.architectures.mcnet import MCNet
    from nnunet_ext.architectures.transdodnet import TransDoDNet

    return {  # network class name -> builder(num_classes, num_tasks); tasks only matter for the universal ones
        "CoTr": lambda c, t: CoTr(1, c, [32, 64, 64]), "BANet": _banet, "UniSeg": _uniseg,
        "MCNet": lambda c, t: MCNet(1, c), "LeFeD": lambda c, t: LeFeD(1, c), "ClassSAM": _class_sam,
        "DoDNet": lambda c, t: DoDNet(1, t, c), "TransDoDNet": lambda c, t: TransDoDNet(1, t, c),
    }


@pytest.mark.parametrize("name", sorted(HEADS))
def test_the_head_is_exactly_what_changes_with_the_label_count_and_the_tasks(name):
    build = _variants()[name]
    with torch.device("meta"):
        base, more_classes, more_tasks = build(2, 3), build(3, 3), build(2, 4)
    assert head_patterns(base) == HEADS[name]
    own = base.state_dict()
    changed = {key for other in (more_classes, more_tasks) for key, value in other.state_dict().items()
               if key not in own or tuple(own[key].shape) != tuple(value.shape)}
    assert changed, "the variants must differ"
    assert {key for key in own if is_head(key, HEADS[name])} == changed


def test_every_registered_network_has_a_head_entry():
    from nnunet_ext.registry import import_object, paper_networks

    classes = set()
    for entry in paper_networks().values():
        module, function = entry.builder.split(":")
        built = import_object(entry.builder).__annotations__.get("return")
        classes.add(built if isinstance(built, str) else built.__name__)
    assert classes == set(HEADS)


# --- nnU-Net's -pretrained_weights, routed --------------------------------------------------------------

def _small_mcnet(classes: int, channels: int = 1, decoders: int = 3):
    from nnunet_ext.architectures.mcnet import MCNet

    torch.manual_seed(classes * 10 + channels)
    return MCNet(channels, classes, strides=[[2, 2, 2]] * 2, num_decoders=decoders, base_filters=4)


def test_another_label_count_loads_everything_but_the_head_which_keeps_its_initialisation(tmp_path, capsys):
    source, target = _small_mcnet(2), _small_mcnet(4)
    path = tmp_path / "w.pth"
    torch.save({"network_weights": source.state_dict()}, path)
    fresh = {key: value.clone() for key, value in target.state_dict().items()}
    routed_loader()(target, str(path), False)
    loaded, theirs = target.state_dict(), source.state_dict()
    heads = [key for key in loaded if is_head(key, HEADS["MCNet"])]
    assert len(heads) == 6
    assert all(torch.equal(loaded[key], fresh[key]) for key in heads)
    assert all(torch.equal(loaded[key], theirs[key]) for key in loaded if key not in heads)
    assert target.nnunet_ext_pretrained_from == str(path)
    assert "re-initialised (head" in capsys.readouterr().out
    same = _small_mcnet(2)  # the same label count: the head is loaded too
    routed_loader()(same, str(path), False)
    assert all(torch.equal(value, theirs[key]) for key, value in same.state_dict().items())


def test_any_other_mismatch_is_one_line_naming_the_layers_and_nothing_changes(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"network_weights": _small_mcnet(2).state_dict()}, path)
    for target, needles in ((_small_mcnet(2, channels=2), ["of another shape", "encoder.stages.0.0.weight",
                                                            "(file [4, 1, 3, 3, 3], network [4, 2, 3, 3, 3])"]),
                            (_small_mcnet(2, decoders=2), ["in the file but not in the network",
                                                            "decoder.decoders.2.stages"])):
        before = {key: value.clone() for key, value in target.state_dict().items()}
        with pytest.raises(UserFacingError) as error:
            routed_loader()(target, str(path), False)
        message = str(error.value)
        assert "\n" not in message and "Only the head (decoder.decoders.*.head.*) may differ" in message
        assert all(needle in message for needle in needles), message
        assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())


def test_other_networks_keep_nnunets_loader(tmp_path):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    def unet(classes):
        return PlainConvUNet(1, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 2, classes, 2, conv_bias=True)

    source, target = unet(2), unet(5)
    path = tmp_path / "w.pth"
    torch.save({"network_weights": source.state_dict()}, path)
    routed_loader()(target, str(path), False)  # nnU-Net's: .seg_layers. skipped
    first = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(target.state_dict()[first], source.state_dict()[first])
    two_channels = PlainConvUNet(2, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 2, 2, 2)
    with pytest.raises(AssertionError, match="not the same"):  # nnU-Net's own refusal, unchanged
        routed_loader()(two_channels, str(path), False)


def test_unreadable_and_foreign_files_are_one_line_errors(tmp_path):
    target = _small_mcnet(2)
    for content, needle in ((b"garbage" * 10, "truncated or not a PyTorch checkpoint"),
                            ({"state_dict": {"a": torch.zeros(1)}}, "not an nnU-Net v2 checkpoint")):
        path = tmp_path / "w.pth"
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(UserFacingError, match=needle):
            routed_loader()(target, str(path), False)
    with pytest.raises(UserFacingError, match="does not exist"):
        routed_loader()(target, str(tmp_path / "absent.pth"), False)


@pytest.mark.parametrize("name", ["CoTr", "TransDoDNet"])
def test_official_weights_are_refused_in_the_corrected_axis_order(tmp_path, name):
    """They would load without error and compute something else (docs: CoTr, TransDoDNet)."""
    from nnunet_ext.architectures import paper_network
    from nnunet_ext.official_weights import official_network

    official = official_network(name)
    path = tmp_path / "imported.pth"
    torch.save({"network_weights": {k: torch.zeros((), dtype=v.dtype).expand(v.shape)  # stride 0: a few kB
                                    for k, v in official.state_dict().items()},
                IMPORT_KEY: {"network": name, "conventions": "official"}}, path)
    with torch.device("meta"):
        corrected = paper_network(name, "default")
    with pytest.raises(UserFacingError) as error:
        routed_loader()(corrected, str(path), False)
    message = str(error.value)
    assert f"official {name} weights" in message and "axis_order='corrected'" in message
    assert '"axis_order": "official"' in message and "\n" not in message


# --- the stock path in-process: plans with the official topology ------------------------------------------

def _classes(arguments: dict) -> dict:
    """Network keywords as JSON plans hold them (classes as import paths)."""
    def text(cls):
        return f"{cls.__module__}.{cls.__qualname__}"

    return {key: text(value) if isinstance(value, type) else value for key, value in arguments.items()}


def official_plans(root, identifier: str, class_name: str, arch_kwargs: dict, patch_size, batch_size: int = 2) -> str:
    """A copy of the root's nnUNetPlans whose 3d_fullres builds the official topology (same preprocessed data)."""
    folder = root.preprocessed / root.dataset_name
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    configuration.update(patch_size=list(patch_size), batch_size=batch_size)
    configuration["architecture"] = {
        "network_class_name": class_name, "arch_kwargs": _classes(arch_kwargs),
        "_kw_requires_import": [k for k, v in arch_kwargs.items() if isinstance(v, type)]}
    plans.update(plans_name=identifier, configurations={"3d_fullres": configuration})
    (folder / f"{identifier}.json").write_text(json.dumps(plans, indent=2))
    return identifier


def banet_official_plans(root) -> str:
    from nnunet_ext.architectures.banet import nnunet_default_topology_3d
    from nnunet_ext.trainers.banet import BANET_CLASS_NAME

    topology = nnunet_default_topology_3d((128,) * 3)  # the official KiPA22 network (registry: BANet)
    return official_plans(root, "nnUNetPlans_officialBANet", BANET_CLASS_NAME,
                          dict(topology, conventions="official"), [32, 64, 64])  # bottleneck 1x2x2, not 1 voxel


def uniseg_official_plans(root) -> str:
    from nnunet_ext.trainers.uniseg import UNISEG_CLASS_NAME

    topology = dict(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
                    kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5, strides=[[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * 4,
                    n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5, conv_bias=True,
                    norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                    dropout_op_kwargs=None, nonlin=nn.LeakyReLU,
                    nonlin_kwargs={"negative_slope": 1e-2, "inplace": True}, conventions="official")
    return official_plans(root, "nnUNetPlans_officialUniSeg", UNISEG_CLASS_NAME, topology, [32, 64, 64])


def imported(tmp_path, name: str, fixture_name: str, container, values=expanded_official) -> tuple[Path, dict]:
    """An official-format file imported with the CLI: (OUT.pth, its network_weights)."""
    checkpoint, out = tmp_path / f"official_{fixture_name}.pth", tmp_path / f"{fixture_name}_imported.pth"
    torch.save(container(values(fixture_name)), checkpoint)
    outcome = run_cli(["import-weights", name, str(checkpoint), "-o", str(out)])
    assert outcome.returncode == 0, outcome.output
    return out, torch.load(out, weights_only=True)["network_weights"]


def v1_model(state: dict) -> dict:
    return {"epoch": 1000, "state_dict": state, "optimizer_state_dict": None, "plot_stuff": ([np.float64(0.5)],),
            "best_stuff": (999, np.float64(0.3))}


def stock_pretrained_load(root, trainer_class, plans: str, weights: Path, monkeypatch):
    """nnUNetv2_train's own steps before training: the trainer from the plans, then maybe_load_checkpoint."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    trainer = load_trainer(root, trainer_class, monkeypatch, plans=plans)
    trainer.initialize()
    fresh = {key: value.clone() for key, value in trainer.network.state_dict().items()}
    trainer.was_initialized = True
    maybe_load_checkpoint(trainer, False, False, str(weights))
    return trainer, fresh


@pytest.mark.slow  # a 48 M-parameter trainer; the default suite runs UniSeg's, and the cheap MC-Net checks above
def test_banet_official_weights_through_nnunets_pretrained_path(nnunet_root, tmp_path, monkeypatch):
    """KiPA's BA-Net (5 classes, 1 channel) on the 5-class harness dataset: every tensor is the imported one."""
    from nnunet_ext.trainers.banet import BANetTrainer

    plans = banet_official_plans(nnunet_root)
    weights_file, weights = imported(tmp_path, "BANet", "banet", v1_model)
    trainer, _ = stock_pretrained_load(nnunet_root, BANetTrainer, plans, weights_file, monkeypatch)
    loaded = trainer.network.state_dict()
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in loaded)


def test_uniseg_official_weights_on_other_tasks_reinitialise_only_the_head(universal_root, tmp_path, monkeypatch,
                                                                           capsys):
    """The 11-task official UniSeg on the 3-task universal dataset (channels 1, 2, 4 as the official input
    convs): prompt, FUSE and 1x1 heads re-initialised, everything else the imported weights."""
    from nnunet_ext.trainers.uniseg import UniSegTrainer

    plans = uniseg_official_plans(universal_root)
    weights_file, weights = imported(tmp_path, "UniSeg", "uniseg", v1_model)
    trainer, fresh = stock_pretrained_load(universal_root, UniSegTrainer, plans, weights_file, monkeypatch)
    loaded = trainer.network.state_dict()
    heads = {key for key in loaded if is_head(key, HEADS["UniSeg"])}
    assert heads and set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], fresh[k]) and loaded[k].shape != weights[k].shape for k in heads)
    assert all(torch.equal(loaded[k], weights[k]) for k in set(loaded) - heads)
    assert "prompt ([1, 11, 4, 6, 6] -> [1, 3, 2, 2, 2])" in capsys.readouterr().out


@pytest.mark.parametrize("name, fixture_name", [("BANet", "banet"), ("UniSeg", "uniseg")])
def test_default_conventions_refuse_official_weights_in_one_line(tmp_path, name, fixture_name):
    from nnunet_ext.architectures import paper_network

    weights_file, _ = imported(tmp_path, name, fixture_name, v1_model)
    with torch.device("meta"):
        default = paper_network(name, "default")
    with pytest.raises(UserFacingError) as error:
        routed_loader()(default, str(weights_file), False)
    message = str(error.value)
    assert "conventions='default'" in message and '"conventions": "official"' in message and "\n" not in message


# --- ClassSAM: SurgicalSAM's checkpoint + the SAM checkpoint ---------------------------------------------------

def surgical_sam_files(tmp_path, network) -> tuple[Path, Path]:
    """What SurgicalSAM's train.py saves (model_ckp.pth) and the SAM checkpoint it started from, from a
    ClassSAM's weights under the official names."""
    from nnunet_ext.architectures.class_sam import build_sam
    from nnunet_ext.official_weights import SURGICAL_SAM_PARTS

    official = network.official_state_dict()
    surgical = {part: OrderedDict((k[len(part) + 1:], v) for k, v in official.items() if k.startswith(part + "."))
                for part in SURGICAL_SAM_PARTS}
    sam = build_sam(network.sam_model_type).state_dict()
    sam.update({k: v for k, v in official.items() if k.startswith(("image_encoder.", "prompt_encoder.pe_layer."))})
    ckp, sam_file = tmp_path / "model_ckp.pth", tmp_path / "sam_tiny.pth"
    torch.save(surgical, ckp)
    torch.save(sam, sam_file)
    return ckp, sam_file


def test_class_sam_official_names_need_the_official_conventions():
    """(Names and shapes against the fixture: tests/test_import_weights.py, parametrised over networks.)"""
    from nnunet_ext.architectures.class_sam import ClassSAM

    with pytest.raises(ValueError, match="conventions='official'"):
        ClassSAM(3, 3, sam_model_type="tiny").official_key_map()


def test_class_sam_import_reads_both_files_loads_strictly_and_runs(tmp_path):
    from nnunet_ext.architectures.class_sam import ClassSAM

    torch.manual_seed(0)
    network = ClassSAM(3, 4, sam_model_type="tiny", num_tokens=4, conventions="official")  # EndoVis2017: 4 tokens
    ckp, sam_file = surgical_sam_files(tmp_path, network)
    out = tmp_path / "class_sam.pth"
    before = snapshot(ckp, sam_file)
    outcome = run_cli(["import-weights", "ClassSAM", str(ckp), "--sam-checkpoint", str(sam_file), "-o", str(out)])
    assert outcome.returncode == 0, outcome.output
    assert snapshot(ckp, sam_file) == before
    assert "4 classes with background" in outcome.stdout and "'num_tokens': 4" in outcome.stdout
    saved = torch.load(out, weights_only=True)
    assert saved[IMPORT_KEY]["network_settings"]["sam_model_type"] == "tiny"
    rebuilt = ClassSAM(3, 4, **{k: v for k, v in saved[IMPORT_KEY]["network_settings"].items()})
    rebuilt.load_state_dict(saved["network_weights"], strict=True)
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in rebuilt.state_dict().items())
    rebuilt.eval()
    with torch.no_grad():
        x = torch.rand(1, 3, 40, 50)
        assert torch.equal(rebuilt(x), network.eval()(x)) and rebuilt(x).shape == (1, 4, 40, 50)


def test_class_sam_import_refusals(tmp_path):
    from nnunet_ext.architectures.class_sam import ClassSAM

    network = ClassSAM(3, 3, sam_model_type="tiny", conventions="official")
    ckp, sam_file = surgical_sam_files(tmp_path, network)
    out = tmp_path / "out.pth"
    outcome = run_cli(["import-weights", "ClassSAM", str(ckp), "-o", str(out)])
    assert_refused(outcome, ["needs --sam-checkpoint", "frozen image encoder"], absent=[out])
    outcome = run_cli(["import-weights", "ClassSAM", str(ckp), "--sam-checkpoint", str(ckp), "-o", str(out)])
    assert_refused(outcome, ["holds no state dict"], absent=[out])
    broken = torch.load(ckp, weights_only=True)
    del broken["prototypes_state_dict"]
    torch.save(broken, ckp)
    outcome = run_cli(["import-weights", "ClassSAM", str(ckp), "--sam-checkpoint", str(sam_file), "-o", str(out)])
    assert_refused(outcome, ["is not a SurgicalSAM checkpoint", "prototypes_state_dict"], absent=[out])
    outcome = run_cli(["import-weights", "DoDNet", str(ckp), "--sam-checkpoint", str(sam_file), "-o", str(out)])
    assert_refused(outcome, ["--sam-checkpoint is for ClassSAM only"], absent=[out])


def test_class_sam_official_preprocessing_is_sams_predictor():
    """conventions='official': the image embedding of an rgb_to_0_1 patch equals SamPredictor.set_image's
    on the uint8 frame (SurgicalSAM's tools/data_preprocess.py), with the same encoder weights."""
    from segment_anything import SamPredictor

    from nnunet_ext.architectures.class_sam import ClassSAM, build_sam

    torch.manual_seed(0)
    network = ClassSAM(3, 3, sam_model_type="tiny", conventions="official").eval()
    sam = build_sam("tiny").eval()
    sam.image_encoder.load_state_dict(network.image_encoder.state_dict())
    predictor = SamPredictor(sam)
    frame = np.random.default_rng(0).integers(0, 256, (48, 60, 3), dtype=np.uint8)
    predictor.set_image(frame)
    patch = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255  # nnU-Net's rgb_to_0_1
    assert torch.equal(network.encode(patch), predictor.features)
    default = ClassSAM(3, 3, sam_model_type="tiny").eval()
    default.image_encoder.load_state_dict(network.image_encoder.state_dict())
    assert not torch.equal(default.encode(patch), predictor.features)  # the default preprocesses differently


# --- model folders from imported weights --------------------------------------------------------------------

def test_model_folder_is_refused_unless_the_trainer_builds_the_checkpoints_network(nnunet_root, tmp_path):
    plans = json.loads((nnunet_root.preprocessed / nnunet_root.dataset_name / "nnUNetPlans.json").read_text())
    dataset_json = nnunet_root.preprocessed / nnunet_root.dataset_name / "dataset.json"
    checkpoint = tmp_path / "banet.model"
    torch.save(v1_model(expanded_official("banet")), checkpoint)
    folder = tmp_path / "model"
    for conventions, needles in (("default", ["conventions='default'"]),  # nnU-Net's plans as they are
                                 ("official", ["do not fit the BANet", "the head must fit too"])):  # not KiPA's
        plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["conventions"] = conventions
        plans_file = tmp_path / f"plans_{conventions}.json"
        plans_file.write_text(json.dumps(plans))
        outcome = run_cli(["import-weights", "BANet", str(checkpoint), "--model-folder", str(folder), "--plans",
                           str(plans_file), "--dataset-json", str(dataset_json), "-tr", "BANetTrainer"])
        assert_refused(outcome, needles, absent=[folder], clean=[tmp_path])
    outcome = run_cli(["import-weights", "BANet", str(checkpoint), "--model-folder", str(folder)])
    assert_refused(outcome, ["--model-folder needs --plans, --dataset-json, -tr"], absent=[folder])
    outcome = run_cli(["import-weights", "BANet", str(checkpoint)])
    assert_refused(outcome, ["give at least one"])


@pytest.mark.slow
def test_banet_model_folder_from_imported_weights_predicts_with_nnunetv2_predict(nnunet_root, tmp_path):
    plans = banet_official_plans(nnunet_root)
    folder = tmp_path / "BANetTrainer__officialBANet__3d_fullres"
    checkpoint = tmp_path / "banet.model"
    torch.save(v1_model(random_official("banet")), checkpoint)
    outcome = run_cli(["import-weights", "BANet", str(checkpoint), "--model-folder", str(folder), "--plans",
                       str(nnunet_root.preprocessed / nnunet_root.dataset_name / f"{plans}.json"), "--dataset-json",
                       str(nnunet_root.dataset_raw / "dataset.json"), "-tr", "BANetTrainer"])
    assert outcome.returncode == 0, outcome.output
    output = tmp_path / "predictions"
    run_stock(["nnUNetv2_predict_from_modelfolder", "-i", nnunet_root.dataset_raw / "imagesTs", "-o", output,
               "-m", folder, "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1, "--disable_progress_bar", "--disable_tta"],
              nnunet_root.env())
    cases = sorted(p.name for p in (nnunet_root.dataset_raw / "labelsTs").iterdir())
    assert sorted(p.name for p in output.glob("*.nii.gz")) == cases


# --- the stock command end to end ---------------------------------------------------------------------------

def _distance(a: dict, b: dict, keys) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["BANet", "UniSeg"])
def test_stock_nnunetv2_train_fine_tunes_from_imported_official_weights(method, nnunet_root, universal_root, tmp_path):
    """``nnUNetv2_train D 3d_fullres 0 -tr XTrainer -p PLANS -pretrained_weights W`` for one epoch of one
    step: the final weights outside the head are within one SGD step of the imported ones (nnU-Net's
    update is at most lr x (1 + momentum) x clip = 0.01 x 1.99 x 12 in norm), far from a fresh network."""
    root, plans = (nnunet_root, banet_official_plans(nnunet_root)) if method == "BANet" else \
        (universal_root, uniseg_official_plans(universal_root))
    fixture_name = method.lower()
    weights_file, weights = imported(tmp_path, method, fixture_name, v1_model, values=random_official)
    trainer = f"{method}Trainer"
    results = tmp_path / "results"
    completed = run_stock(["nnUNetv2_train", root.dataset_id, "3d_fullres", 0, "-tr", trainer, "-p", plans,
                           "-device", "cpu", "-pretrained_weights", weights_file],
                          root.env(epochs=1, iterations=1, nnUNet_results=str(results)))
    assert "nnunet-ext: pretrained weights" in completed.stdout
    checkpoint = results / root.dataset_name / f"{trainer}__{plans}__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    body = [k for k in final if not is_head(k, HEADS[method]) and final[k].is_floating_point()]
    step = 0.01 * 1.99 * 12
    assert _distance(final, weights, body) <= step + 1e-3
    assert _distance({k: torch.zeros_like(final[k]) for k in body}, weights, body) > 10 * step  # not trivially close
    read_weights(checkpoint)  # a fine-tuned checkpoint is itself a -pretrained_weights file (allow-list suffices)


def seven_task_dataset_json(source_dataset_json: dict) -> dict:
    """A merged dataset.json of 7 single-channel tasks (DoDNet's official MOTS count) with at most 2
    structures each: task 0 is the real source dataset, tasks 1-6 exist only in the map (prediction
    reads the model's dataset.json, not their images)."""
    merged = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "lesion": 4}
    annotated = [("liver", "kidney"), ("spleen",), ("liver", "lesion"), ("kidney",), ("spleen", "kidney"),
                 ("lesion",), ("liver",)]
    tasks = {}
    for index, names in enumerate(annotated):
        name = "SynthLiverKidney" if index == 0 else f"Official{index}"
        tasks[name] = {
            "task_id": index, "source": f"Dataset{971 + 10 * index}_{name}", "case_prefix": f"T{index:02d}{name}_",
            "num_channels": 1, "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{n: merged[n] for n in names}},
            "to_source": {"0": 0, **{str(merged[n]): position + 1 for position, n in enumerate(names)}},
            "source_labels": {"background": 0, **{n: position + 1 for position, n in enumerate(names)}}}
    return {"channel_names": {"0": "CT"}, "labels": merged, "numTraining": 28,
            "file_ending": source_dataset_json["file_ending"], "name": "OfficialMOTSLike", "tasks": tasks}


@pytest.mark.slow
def test_dodnet_model_folder_from_imported_weights_predicts_a_task(nnunet_root, tmp_path):
    """``nnunet-ext predict --task`` with a model folder written by ``import-weights --model-folder`` from
    an official-format DoDNet checkpoint (7 tasks, 1 channel, 2 sigmoid channels per task)."""
    from nnunet_ext.datasets.multi_dataset import MULTI_SPEC, write_partially_labelled_dataset

    source = write_partially_labelled_dataset(tmp_path / "raw", 971, "SynthLiverKidney", MULTI_SPEC,
                                              ("liver", "kidney"))
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps(seven_task_dataset_json(json.loads((source / "dataset.json").read_text()))))
    plans = json.loads((nnunet_root.preprocessed / nnunet_root.dataset_name / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=5, features_per_stage=[32, 64, 128, 256, 256], kernel_sizes=[[3, 3, 3]] * 5,
                strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]], n_conv_per_stage=[2] * 5,
                n_conv_per_stage_decoder=[2] * 4)  # five downsampling stages: the official layers
    plans["configurations"]["3d_fullres"]["patch_size"] = [16, 48, 48]
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(plans))
    checkpoint = tmp_path / "MOTS_DynConv_e999.pth"
    torch.save(OrderedDict(("module." + k, v) for k, v in random_official("dodnet").items()), checkpoint)
    folder = tmp_path / "DoDNetTrainer__official__3d_fullres"
    outcome = run_cli(["import-weights", "DoDNet", str(checkpoint), "--model-folder", str(folder), "--plans",
                       str(plans_file), "--dataset-json", str(dataset_json), "-tr", "DoDNetTrainer"])
    assert outcome.returncode == 0, outcome.output
    output = tmp_path / "predictions"
    run_stock(["nnunet-ext", "predict", "--task", "SynthLiverKidney", "-i", source / "imagesTs", "-o", output,
               "-m", folder, "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1], nnunet_root.env())
    cases = sorted(p.name for p in (source / "labelsTs").iterdir())
    assert sorted(p.name for p in output.glob("*.nii.gz")) == cases
