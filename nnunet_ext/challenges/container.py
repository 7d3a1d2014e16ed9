"""``nnunet-ext container``: a Docker build context for a challenge's algorithm container.

The context holds a ``Dockerfile`` on an official PyTorch CUDA runtime image (``pytorch/pytorch``),
the nnunet-ext wheel to install (nnunet-ext pulls nnU-Net), the trained model (the folds' chosen
checkpoints with the model folder's dataset.json and plans.json, laid out as ``nnUNet_results``; or an
``nnUNetv2_export_model_to_zip`` zip, installed at build time with
``nnUNetv2_install_pretrained_model_from_zip``) and one entry point, ``nnunet-ext challenge-infer
CHALLENGE --input /input --output /output ...`` (:mod:`nnunet_ext.challenges.infer`): the challenge's
input/output interface, GPU when the container sees one, CPU otherwise. The container runs as a
non-root user and needs no network at run time, as grand-challenge.org requires (neheller/kits21
``examples/submission/sanity_check_guide.md``; HiLab-git/SegRap2023 Docker examples).

Every value that reaches the Dockerfile is checked against the characters its field can hold (names
of nnU-Net models, an image reference, a wheel file name) and refused otherwise; the entry point is
written in Docker's exec (JSON) form, so no shell ever reads it. The context is written into a
staging folder and appears whole (:func:`nnunet_ext.atomic_io.staged_folder`); an existing folder is
replaced only when it is an earlier context of ours.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from nnunet_ext import atomic_io
from nnunet_ext.challenges import infer, registry
from nnunet_ext.cluster.quoting import check_text, show
from nnunet_ext.errors import UserFacingError

#: PyTorch 2.5.1 with CUDA 12.4 (Python 3.11); inside nnunet-ext's torch range (>=2.1.2, not 2.9).
DEFAULT_BASE_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
MARKER = ".nnunet_ext_container.json"
APP = "/opt/algorithm"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_BASE_IMAGE = re.compile(r"pytorch/pytorch:[A-Za-z0-9][A-Za-z0-9_.-]*")
_WHEEL = re.compile(r"nnunet_ext-[A-Za-z0-9_.+!-]+\.whl")


@dataclass(frozen=True)
class ContainerSpec:
    """What goes into the build context (and into its marker file)."""

    challenge: str
    task: str | None
    dataset: str  # DatasetXXX_NAME
    configuration: str
    trainer: str
    plans: str
    folds: tuple
    checkpoint: str
    base_image: str

    @property
    def model_relative(self) -> str:
        return f"{self.dataset}/{self.trainer}__{self.plans}__{self.configuration}"

    def entrypoint(self) -> list[str]:
        words = ["nnunet-ext", "challenge-infer", self.challenge]
        if self.task is not None:
            words += ["--task", self.task]
        return words + ["--input", "/input", "--output", "/output", "-d", self.dataset, "-c", self.configuration,
                        "-tr", self.trainer, "-p", self.plans, "-f", *map(str, self.folds), "-chk", self.checkpoint]


def check_name(what: str, value: str) -> str:
    """Refuse a value that cannot be an nnU-Net name (it would reach the Dockerfile)."""
    check_text(what, value)
    if not _NAME.fullmatch(value):
        raise UserFacingError(f"{what}: {show(value)} is not a name nnU-Net writes (letters, digits, '_', '.', '+', "
                              f"'-'); it would be written into the Dockerfile. Give the name as nnU-Net spells it.")
    return value


def check_base_image(value: str) -> str:
    check_text("--base-image", value)
    if not _BASE_IMAGE.fullmatch(value):
        raise UserFacingError(f"--base-image {show(value)}: give an official PyTorch image, pytorch/pytorch:TAG (e.g. "
                              f"{DEFAULT_BASE_IMAGE}); a CUDA 'runtime' tag runs on GPU and CPU.")
    return value


def check_wheel(path: Path) -> Path:
    """The nnunet-ext wheel to install in the container, or a refusal saying how to build one."""
    check_text("--wheel", str(path))
    how = "build it from the nnunet-ext source folder with: pip wheel --no-deps -w dist ."
    if not path.is_file():
        raise UserFacingError(f"--wheel {path} is not a file; {how}")
    if not _WHEEL.fullmatch(path.name):
        raise UserFacingError(f"--wheel {show(path.name)} is not an nnunet-ext wheel file name "
                              f"(nnunet_ext-VERSION-....whl); {how}")
    try:
        with zipfile.ZipFile(path) as wheel:
            if not any(name.startswith("nnunet_ext/") for name in wheel.namelist()):
                raise UserFacingError(f"--wheel {path} holds no nnunet_ext package; {how}")
    except zipfile.BadZipFile:
        raise UserFacingError(f"--wheel {path} is not a wheel (not a zip archive); {how}") from None
    return path


def _model_files(folder: Path, spec: ContainerSpec) -> list[tuple[Path, str]]:
    """(source, path in the context) of what nnU-Net's predictor reads from a model folder."""
    files = [(folder / name, name) for name in ("dataset.json", "plans.json", "dataset_fingerprint.json")
             if (folder / name).is_file()]
    files += [(folder / f"fold_{fold}" / spec.checkpoint, f"fold_{fold}/{spec.checkpoint}") for fold in spec.folds]
    return [(source, f"nnUNet_results/{spec.model_relative}/{relative}") for source, relative in files]


def _check_zip(zip_path: Path, spec: ContainerSpec, interface) -> None:
    """The export zip holds the model (dataset.json, plans.json, each fold's checkpoint) and it fits the challenge."""
    check_text("--export-zip", str(zip_path))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = set(archive.namelist())
            wanted = [f"{spec.model_relative}/{name}" for name in ("dataset.json", "plans.json")] + \
                [f"{spec.model_relative}/fold_{fold}/{spec.checkpoint}" for fold in spec.folds]
            missing = [name for name in wanted if name not in names]
            if missing:
                raise UserFacingError(f"--export-zip {zip_path} has no {missing[0]}: export the model with "
                                      f"nnUNetv2_export_model_to_zip -d {spec.dataset} -c {spec.configuration} -tr "
                                      f"{spec.trainer} -p {spec.plans} -f {' '.join(map(str, spec.folds))} "
                                      f"-chk {spec.checkpoint}.")
            dataset_json = json.loads(archive.read(wanted[0]))
            plans = json.loads(archive.read(wanted[1]))
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UserFacingError(f"--export-zip {zip_path} cannot be read ({error}); export it again with "
                              f"nnUNetv2_export_model_to_zip.") from None
    infer.check_model_fits(interface, dataset_json, plans, spec.model_relative.split("/")[1], str(zip_path))


def dockerfile(spec: ContainerSpec, wheel: str, from_zip: bool) -> str:
    title = registry.get(spec.challenge).title + (f" task {spec.task}" if spec.task else "")
    model = (f"COPY model/model.zip {APP}/model.zip\n"
             f"RUN nnUNetv2_install_pretrained_model_from_zip {APP}/model.zip && rm {APP}/model.zip\n") if from_zip \
        else f"COPY nnUNet_results/ {APP}/nnUNet_results/\n"
    return (f"# {title} algorithm container, written by nnunet-ext container. Build: docker build -t NAME .\n"
            f"FROM {spec.base_image}\n"
            f"RUN groupadd -r user && useradd -m --no-log-init -r -g user user\n"
            f"COPY wheels/{wheel} {APP}/wheels/{wheel}\n"
            f"RUN python -m pip install --no-cache-dir {APP}/wheels/{wheel}\n"
            f"ENV nnUNet_results={APP}/nnUNet_results nnUNet_raw={APP}/nnUNet_raw "
            f"nnUNet_preprocessed={APP}/nnUNet_preprocessed\n"
            + model +
            "USER user\n"
            f"ENTRYPOINT {json.dumps(spec.entrypoint())}\n")


def readme(spec: ContainerSpec) -> str:
    interface = registry.container_interface(spec.challenge, spec.task)
    inputs = "\n".join(f"    /input/{slot.folder + '/' if slot.folder else ''}<name>{slot.extension}   {slot.what}"
                       for slot in interface.inputs)
    folder = interface.output_folder + "/" if interface.output_folder else ""
    out = f"/output/{folder}<name>{interface.output.extension}"
    return (f"Build context of a {interface.output.title} (nnunet-ext container).\n\n"
            f"Inputs:\n{inputs}\nOutput (named like the first input): {out}\nInterface source: {interface.source}\n"
            + ("The challenge's pages do not state this interface; it is assumed (see the nnunet-ext how-to page).\n"
               if interface.assumed else "") +
            "\nBuild, try and save (grand-challenge.org takes the gzipped image):\n"
            "    docker build -t my-algorithm .\n"
            "    docker run --rm --gpus all --network none -v $PWD/in:/input:ro -v $PWD/out:/output my-algorithm\n"
            "    docker save my-algorithm | gzip -c > my-algorithm.tar.gz\n")


def _is_ours(folder: Path) -> bool:
    try:
        return "nnunet_ext_container" in json.loads((folder / MARKER).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _check_output(out: Path, sources: Sequence[Path]) -> bool:
    """True when ``out`` exists and is an earlier context of ours (replaced); refuses anything else there."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserFacingError(f"-o {out} exists and is not a folder; it was left untouched. Give a new folder.")
    target = out.resolve()
    for source in sources:
        source = source.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise UserFacingError(f"-o {out} overlaps {source}, which is only read. Give a new folder outside it.")
    if not out.exists() or not any(out.iterdir()):
        return out.exists()
    if not _is_ours(out):
        raise UserFacingError(f"-o {out} already holds files not written by nnunet-ext container; it was left "
                              f"untouched. Give a new or empty folder, or remove it yourself.")
    return True


def _copy(source: Path, target: Path) -> None:
    atomic_io.write_with(target, lambda temporary: shutil.copyfile(source, temporary))


def write_context(spec: ContainerSpec, wheel: Path, out: str | os.PathLike, *, model_folder: Path | None = None,
                  export_zip: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Check everything, then write the build context into ``out`` (staged; it appears whole)."""
    interface = registry.container_interface(spec.challenge, spec.task)
    for what, value in (("-c", spec.configuration), ("-tr", spec.trainer), ("-p", spec.plans),
                        ("-chk", spec.checkpoint), ("-d", spec.dataset)):
        check_name(what, value)
    for fold in spec.folds:
        check_name("-f", str(fold))
    check_base_image(spec.base_image)
    check_wheel(wheel)
    if export_zip is not None:
        _check_zip(export_zip, spec, interface)
        files = [(export_zip, "model/model.zip")]
    else:
        assert model_folder is not None
        infer.check_model(interface, model_folder, spec.folds, spec.checkpoint)
        files = _model_files(model_folder, spec)
    files.append((wheel, f"wheels/{wheel.name}"))
    out = Path(out)
    replace = _check_output(out, [source for source, _ in files] + ([model_folder] if model_folder else []))
    target = out.resolve()
    with atomic_io.exclusive(target, "nnunet-ext container", timeout=60.0):
        atomic_io.remove_stale_temporaries(target.parent)
        with atomic_io.staged_folder(target, replace=replace) as staging:
            for source, relative in files:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                _copy(source, staging / relative)
            atomic_io.write_text(staging / "Dockerfile", dockerfile(spec, wheel.name, export_zip is not None))
            atomic_io.write_text(staging / "README.txt", readme(spec))
            atomic_io.write_json(staging / MARKER, {"nnunet_ext_container": asdict(spec)})
    log(f"Wrote the build context {out}: docker build -t my-algorithm {out}")
    return out
