"""``nnunet-ext challenge-infer`` (the container entry point) and ``nnunet-ext container`` (its build context).

The model is a random-weight nnU-Net model on the session's planned synthetic dataset (no training):
what matters is that challenge-infer's outputs equal ``nnUNetv2_predict``'s on the same images, named
like the inputs, in each challenge's documented container layout (uuid-named ``.mha`` for KiTS21 and
SegRap2023, ``.nii.gz`` for AMOS22), and that the build context's entry point does the same without
Docker.
"""
from __future__ import annotations

import json
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.challenges import registry, segrap2023
from nnunet_ext.testing.harness import run_stock
from nnunet_ext.testing.hostile import run_cli

KITS_LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
GTV_LABELS = {"background": 0, "GTVp": 1, "GTVnd": 2}
MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Predictions in this process on one thread: on a loaded 2-core machine two threads contend (10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_model(root, results: Path, name: str, labels: dict, channels: int, seed: int) -> Path:
    """A model folder as nnUNetv2_train leaves it (fold 0, random weights) on the root's plans, narrowed."""
    import torch

    from nnunet_ext import compat

    plans = json.loads((root.preprocessed / root.dataset_name / "nnUNetPlans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    configuration["normalization_schemes"] = configuration["normalization_schemes"][:1] * channels
    configuration["use_mask_for_norm"] = configuration["use_mask_for_norm"][:1] * channels
    intensities = plans["foreground_intensity_properties_per_channel"]["0"]
    plans["foreground_intensity_properties_per_channel"] = {str(c): intensities for c in range(channels)}
    architecture = configuration["architecture"]
    stages = architecture["arch_kwargs"]["n_stages"]  # a narrow network: milliseconds per window on a CPU
    architecture["arch_kwargs"]["features_per_stage"] = [min(4 * 2 ** i, 8) for i in range(stages)]
    torch.manual_seed(seed)
    network = compat.network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                        architecture["_kw_requires_import"], channels, len(labels), False)
    folder = results / name / MODEL
    (folder / "fold_0").mkdir(parents=True)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {str(c): "CT" for c in range(channels)},
                                                     "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}))
    (folder / "fold_0" / "validation").mkdir()  # what training also leaves; not needed to predict
    (folder / "fold_0" / "validation" / "summary.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def models(nnunet_root, tmp_path_factory):
    """nnUNet_results with a 1-channel model (labels 0-3) and a 2-channel model (GTVp, GTVnd); the test images."""
    results = tmp_path_factory.mktemp("challenge_models") / "nnUNet_results"
    one = _write_model(nnunet_root, results, "Dataset901_OneChannel", KITS_LABELS, 1, seed=0)
    two = _write_model(nnunet_root, results, "Dataset902_TwoChannels", GTV_LABELS, 2, seed=1)
    images = sorted((nnunet_root.dataset_raw / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) == 2
    return results, one, two, images


def _stock_predict(models, dataset: int, inputs: Path, tmp: Path, subprocess: bool = False) -> Path:
    """``nnUNetv2_predict`` (its console entry point, in this process, or as a subprocess as a user types it), one
    fold, CPU, with mirroring; its output folder.

    ``-npp 0 -nps 0``: nnU-Net predicts in its own process (no worker start-ups); its worker processes run the
    same preprocessing and export functions."""
    import os
    import sys

    results = models[0]
    output = tmp / f"stock_{dataset}"
    arguments = ["nnUNetv2_predict", "-i", inputs, "-o", output, "-d", dataset, "-c", "3d_fullres", "-f", "0",
                 "-device", "cpu", "-npp", "0", "-nps", "0"]
    if subprocess:
        run_stock(arguments, {**_environment(results), "nnUNet_compile": "false"})
        return output
    import torch
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point  # what the console script runs

    saved = sys.argv, os.environ.get("nnUNet_results"), torch.get_num_threads()
    sys.argv, os.environ["nnUNet_results"] = [str(a) for a in arguments], str(results)
    try:
        predict_entry_point()
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            del os.environ["nnUNet_results"]
        else:
            os.environ["nnUNet_results"] = saved[1]
        torch.set_num_threads(saved[2])  # the entry point sets every core on a CPU
    return output


def _environment(results: Path) -> dict:
    import os

    return dict(os.environ, nnUNet_results=str(results), OMP_NUM_THREADS="2")


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """nnUNetv2_predict's predictions of the two test images with the 1-channel model: case -> label map file."""
    tmp = tmp_path_factory.mktemp("stock")
    inputs = tmp / "imagesTs"
    inputs.mkdir()
    for image in models[3]:
        shutil.copy(image, inputs / image.name)
    output = _stock_predict(models, 901, inputs, tmp)
    predictions = {image.name[: -len("_0000.nii.gz")]: output / image.name.replace("_0000", "") for image in models[3]}
    for path in predictions.values():  # several labels: an equality test that could fail
        assert len(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))) >= 3
    return predictions


def _to_mha(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(str(source)), str(target), True)
    return target


def _assert_same_prediction(output: Path, expected: Path) -> None:
    written, wanted = sitk.ReadImage(str(output)), sitk.ReadImage(str(expected))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(wanted))
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(written, attribute)(), getattr(wanted, attribute)()), attribute


def _infer(challenge: str, input_root: Path, output_root: Path, model: Path, *extra: str):
    return run_cli(["challenge-infer", challenge, *extra, "--input", str(input_root), "--output", str(output_root),
                    "-m", str(model), "-device", "cpu"])


def test_kits21_uuid_mha_inputs_give_nnunet_predicts_outputs_under_the_same_names(models, reference, tmp_path):
    _, model, _, images = models
    names = {}
    for image in images:
        name = f"{uuid.uuid4()}.mha"
        names[name] = image.name[: -len("_0000.nii.gz")]
        _to_mha(image, tmp_path / "input" / "images" / "ct" / name)
    outcome = _infer("kits21", tmp_path / "input", tmp_path / "output", model)
    assert outcome.returncode == 0, outcome.output
    folder = tmp_path / "output" / "images" / "kidney-tumor-and-cyst"
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    for name, case in names.items():
        _assert_same_prediction(folder / name, reference[case])
    assert [p.name for p in (tmp_path / "output").iterdir()] == ["images"]


def test_amos22_uuid_nii_inputs_give_nnunet_predicts_outputs_under_the_same_names(models, reference, tmp_path):
    _, model, _, images = models
    names = {}
    for image in images:
        name = f"{uuid.uuid4()}.nii.gz"
        names[name] = image.name[: -len("_0000.nii.gz")]
        (tmp_path / "input").mkdir(exist_ok=True)
        shutil.copy(image, tmp_path / "input" / name)
    (tmp_path / "input" / "inputs.json").write_text("[]")  # grand-challenge's description of the job: not an image
    outcome = _infer("amos22", tmp_path / "input", tmp_path / "output", model, "--task", "2")
    assert outcome.returncode == 0, outcome.output
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == sorted(names)
    for name, case in names.items():
        _assert_same_prediction(tmp_path / "output" / name, reference[case])


def _segrap_job(images, tmp_path: Path) -> tuple[Path, str]:
    """One grand-challenge job: one uuid-named .mha per input folder, the two uuids different."""
    ct = f"{uuid.uuid4()}.mha"
    root = tmp_path / "input"
    _to_mha(images[0], root / "images" / "head-neck-ct" / ct)
    contrast = sitk.ReadImage(str(images[0]))
    contrast = sitk.Cast(contrast, sitk.sitkFloat32) * 1.1 + 5  # a second CT on the same grid
    target = root / "images" / "head-neck-contrast-enhanced-ct" / f"{uuid.uuid4()}.mha"
    target.parent.mkdir(parents=True)
    sitk.WriteImage(contrast, str(target), True)
    return root, ct


def test_segrap2023_pairs_the_two_cts_and_writes_the_4d_stack_named_like_the_ct(models, tmp_path):
    _, _, model, images = models
    root, name = _segrap_job(images, tmp_path)
    outcome = _infer("segrap2023", root, tmp_path / "output", model, "--task", "gtv")
    assert outcome.returncode == 0, outcome.output
    folder = tmp_path / "output" / "images" / "gross-tumor-volume-segmentation"
    assert [p.name for p in folder.iterdir()] == [name]
    stacked = sitk.ReadImage(str(folder / name))
    ct = sitk.ReadImage(str(root / "images" / "head-neck-ct" / name))
    assert stacked.GetSize() == (*ct.GetSize(), 2) and stacked.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(stacked.GetSpacing()[:3], ct.GetSpacing())
    masks = sitk.GetArrayFromImage(stacked)  # (2, z, y, x): GTVp, GTVnd in the organisers' order
    assert set(np.unique(masks)) <= {0, 1} and not np.logical_and(masks[0], masks[1]).any()


@pytest.mark.slow  # a second nnUNetv2_predict run (~15 s): the 2-channel equality; the 1-channel one runs by default
def test_segrap2023_stack_equals_nnunet_predict_on_the_same_two_images(models, tmp_path):
    _, _, model, images = models
    root, name = _segrap_job(images, tmp_path)
    inputs = tmp_path / "stock_in"
    inputs.mkdir()
    for channel, folder in enumerate(("head-neck-ct", "head-neck-contrast-enhanced-ct")):
        (only,) = (root / "images" / folder).iterdir()
        sitk.WriteImage(sitk.ReadImage(str(only)), str(inputs / f"case_{channel:04d}.nii.gz"), True)
    stock = _stock_predict(models, 902, inputs, tmp_path, subprocess=True)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(stock / "case.nii.gz")))
    assert run_cli(["challenge-infer", "segrap2023", "--task", "gtv", "--input", str(root), "--output",
                    str(tmp_path / "out"), "-m", str(model), "-device", "cpu"]).returncode == 0
    masks = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / segrap2023.OUTPUT_FOLDERS["gtv"] / name)))
    assert np.array_equal(masks, np.stack([expected == 1, expected == 2]).astype(np.uint8))


def test_several_cases_per_folder_are_paired_by_file_name(models, tmp_path):
    _, _, model, images = models
    for image in images:
        for folder in ("head-neck-ct", "head-neck-contrast-enhanced-ct"):
            _to_mha(image, tmp_path / "input" / "images" / folder / f"{image.name[:10]}.mha")
    outcome = _infer("segrap2023", tmp_path / "input", tmp_path / "output", model, "--task", "gtv")
    assert outcome.returncode == 0, outcome.output
    assert sorted(p.name for p in (tmp_path / "output" / segrap2023.OUTPUT_FOLDERS["gtv"]).iterdir()) == \
        sorted(f"{image.name[:10]}.mha" for image in images)


# ------------------------------------------------------------------------------------- container


def fake_wheel(folder: Path, name: str = "nnunet_ext-0.1.0-py3-none-any.whl") -> Path:
    """A file shaped like the nnunet-ext wheel (the context is checked, not built, here)."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as wheel:
        wheel.writestr("nnunet_ext/__init__.py", "")
    return folder / name


def _context(models, tmp_path, *extra: str):
    results = models[0]
    return run_cli(["container", "kits21", "-d", "901", "-c", "3d_fullres", "-tr", "nnUNetTrainer", "-f", "0",
                    "--wheel", str(fake_wheel(tmp_path / "dist")), "-o", str(tmp_path / "build"), *extra],
                   _environment(results))


def _entrypoint(dockerfile: str) -> list[str]:
    (line,) = [line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT ")]
    return json.loads(line[len("ENTRYPOINT "):])


def test_build_context_holds_the_model_the_wheel_and_a_runnable_entry_point(models, reference, tmp_path):
    outcome = _context(models, tmp_path)
    assert outcome.returncode == 0, outcome.output
    build = tmp_path / "build"
    files = sorted(str(p.relative_to(build)) for p in build.rglob("*") if p.is_file())
    model = f"nnUNet_results/Dataset901_OneChannel/{MODEL}"
    assert files == [".nnunet_ext_container.json", "Dockerfile", "README.txt", f"{model}/dataset.json",
                     f"{model}/fold_0/checkpoint_final.pth", f"{model}/plans.json",
                     "wheels/nnunet_ext-0.1.0-py3-none-any.whl"]  # no validation folders, logs or other folds
    dockerfile = (build / "Dockerfile").read_text()
    lines = dockerfile.splitlines()
    assert lines[1] == "FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
    assert "RUN python -m pip install --no-cache-dir /opt/algorithm/wheels/nnunet_ext-0.1.0-py3-none-any.whl" in lines
    assert "COPY nnUNet_results/ /opt/algorithm/nnUNet_results/" in lines and lines[-2] == "USER user"
    assert any(line.startswith("ENV nnUNet_results=/opt/algorithm/nnUNet_results") for line in lines)
    entrypoint = _entrypoint(dockerfile)
    assert entrypoint == ["nnunet-ext", "challenge-infer", "kits21", "--input", "/input", "--output", "/output",
                          "-d", "Dataset901_OneChannel", "-c", "3d_fullres", "-tr", "nnUNetTrainer", "-p",
                          "nnUNetPlans", "-f", "0", "-chk", "checkpoint_final.pth"]
    assert (build / model / "fold_0" / "checkpoint_final.pth").read_bytes() == \
        (models[1] / "fold_0" / "checkpoint_final.pth").read_bytes()
    # the entry point, run as the container runs it (its nnUNet_results, /input and /output mounted elsewhere)
    names = {}
    for image in models[3]:
        names[f"{uuid.uuid4()}.mha"] = image.name[: -len("_0000.nii.gz")]
        _to_mha(image, tmp_path / "in" / "images" / "ct" / list(names)[-1])
    arguments = [{"/input": str(tmp_path / "in"), "/output": str(tmp_path / "out")}.get(w, w) for w in entrypoint]
    ran = run_cli(arguments[1:], _environment(build / "nnUNet_results"))
    assert ran.returncode == 0, ran.output
    for name, case in names.items():
        _assert_same_prediction(tmp_path / "out" / "images" / "kidney-tumor-and-cyst" / name, reference[case])


def test_build_context_from_an_export_zip_installs_it_at_build_time(models, tmp_path):
    results, model = models[0], models[1]
    export = tmp_path / "model.zip"
    with zipfile.ZipFile(export, "w") as archive:  # nnUNetv2_export_model_to_zip's layout: paths below nnUNet_results
        for path in model.rglob("*"):
            if path.is_file():
                archive.write(path, str(path.relative_to(results)))
    outcome = run_cli(["container", "kits21", "-d", "901", "-f", "0", "--export-zip", str(export), "--wheel",
                       str(fake_wheel(tmp_path / "dist")), "-o", str(tmp_path / "build")], _environment(tmp_path))
    assert outcome.returncode == 0, outcome.output
    dockerfile = (tmp_path / "build" / "Dockerfile").read_text().splitlines()
    assert "COPY model/model.zip /opt/algorithm/model.zip" in dockerfile
    assert ("RUN nnUNetv2_install_pretrained_model_from_zip /opt/algorithm/model.zip && rm "
            "/opt/algorithm/model.zip") in dockerfile
    assert (tmp_path / "build" / "model" / "model.zip").read_bytes() == export.read_bytes()
    assert not (tmp_path / "build" / "nnUNet_results").exists()


def test_a_rerun_replaces_its_own_context_whole(models, tmp_path):
    assert _context(models, tmp_path).returncode == 0
    (tmp_path / "build" / "leftover.txt").write_text("from the first run")
    marker = json.loads((tmp_path / "build" / ".nnunet_ext_container.json").read_text())
    assert marker["nnunet_ext_container"]["dataset"] == "Dataset901_OneChannel"
    assert _context(models, tmp_path, "--base-image", "pytorch/pytorch:2.4.1-cuda12.1-cudnn9-runtime").returncode == 0
    assert not (tmp_path / "build" / "leftover.txt").exists()
    assert "FROM pytorch/pytorch:2.4.1-cuda12.1-cudnn9-runtime" in (tmp_path / "build" / "Dockerfile").read_text()


# -------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("entry", registry.CHALLENGES, ids=lambda e: e.name)
def test_every_registry_entry_resolves_to_its_converter_labels_formats_and_interface(entry):
    assert callable(registry.load(entry.converter))
    tasks = entry.tasks or (None,)
    for task in tasks:
        labels = registry.load(entry.labels)(task)
        assert labels["background"] == 0
        for phase in entry.phases:
            fmt = registry.submission_format(entry.name, task, phase)
            assert fmt.challenge == entry.name and fmt.phase == phase and fmt.source.startswith("https://")
        interface = registry.container_interface(entry.name, task)
        assert interface.output.challenge == entry.name and interface.source.startswith("https://")
        assert interface.inputs and all(slot.extension in (".mha", ".nii.gz") for slot in interface.inputs)


def test_the_commands_offer_exactly_the_registry_challenges():
    from nnunet_ext.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    for command in ("convert", "submit", "container", "challenge-infer"):
        challenges = commands[command]._subparsers._group_actions[0].choices  # noqa: SLF001
        assert sorted(challenges) == sorted(registry.names()), command
