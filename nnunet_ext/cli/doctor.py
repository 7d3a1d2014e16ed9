"""``nnunet-ext doctor``: is everything in place to train? Prints each check and what to fix.

Exit status 0 when training can run (a missing GPU is a warning), 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

from nnunet_ext import compat
from nnunet_ext._startup import DISCOVERY_FOLDER, EXT_TRAINER_VARIABLE
from nnunet_ext.registry import trainer_paths
from nnunet_ext.setup_checks import ERROR, OK, WARNING, Finding, check_free_disk, check_path_variable


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("doctor", help="check versions, nnU-Net folders, trainer discovery, GPU, disk",
                                   description="Checks that everything needed to train with nnunet-ext is in "
                                               "place and prints what to fix. Exit status 0 if you can train.")
    parser.set_defaults(run=run)


def check_versions() -> list[Finding]:
    findings = [Finding(OK if sys.version_info >= (3, 10) else ERROR, "python", sys.version.split()[0],
                        "" if sys.version_info >= (3, 10) else "use Python 3.10 or newer")]
    try:
        version = compat.nnunet_version()
    except Exception:  # noqa: BLE001 - not installed at all
        return findings + [Finding(ERROR, "nnunetv2", "not installed", 'pip install "nnunetv2>=2.8.1,<2.9"')]
    low, high = (".".join(map(str, v)) for v in compat.SUPPORTED_NNUNET)
    if compat.nnunet_version_supported(version):
        findings.append(Finding(OK, "nnunetv2", version))
    else:
        findings.append(Finding(ERROR, "nnunetv2", f"{version} is outside the tested range >={low},<{high}",
                                f'pip install "nnunetv2>={low},<{high}"'))
    import torch

    findings.append(Finding(OK, "torch", torch.__version__))
    return findings


def check_discovery() -> list[Finding]:
    folders = os.environ.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep)
    fix = 'eval "$(nnunet-ext env)"  (the start-up hook nnunet_ext.pth did not run; reinstall nnunet-ext or ' \
          'unset NNUNET_EXT_NO_AUTODISCOVERY)'
    if DISCOVERY_FOLDER not in folders:
        return [Finding(ERROR, "trainer discovery", f"{EXT_TRAINER_VARIABLE} does not contain {DISCOVERY_FOLDER}",
                        fix)]
    findings = []
    for name in trainer_paths():
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                found = compat.find_trainer_class(name)
        except Exception as error:  # noqa: BLE001 - report, don't crash the doctor
            findings.append(Finding(ERROR, "trainer discovery", f"nnU-Net cannot find {name}: {error}", fix))
            continue
        if not found.__module__.startswith("nnunet_ext.trainers"):
            findings.append(Finding(ERROR, "trainer discovery", f"{name} resolves to {found.__module__}, not ours",
                                    "rename or remove the other trainer of that name"))
    if not findings:
        findings.append(Finding(OK, "trainer discovery", f"nnU-Net finds all {len(trainer_paths())} trainers"))
    return findings


def check_device() -> Finding:
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return Finding(OK, "device", f"CUDA: {torch.cuda.device_count()} x {properties.name} "
                                     f"({properties.total_memory / 1024 ** 3:.0f} GB)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Finding(WARNING, "device", "Apple MPS only: training works but is slow (nnUNetv2_train -device mps)")
    return Finding(WARNING, "device", "no GPU found: training and inference run on the CPU (use -device cpu); "
                                      "fine for the demo, far too slow for real datasets",
                   "run on a machine with an NVIDIA GPU and a CUDA build of torch")


def all_findings() -> list[Finding]:
    findings = check_versions()
    findings += [check_path_variable(name) for name in compat.NNUNET_PATH_VARIABLES]
    findings += [finding for finding in (check_free_disk(name) for name in compat.NNUNET_PATH_VARIABLES) if finding]
    findings += check_discovery()
    findings.append(check_device())
    return findings


def run(args: argparse.Namespace) -> int:
    findings = all_findings()
    for finding in findings:
        print(finding.format())
    errors = sum(f.level == ERROR for f in findings)
    warnings = sum(f.level == WARNING for f in findings)
    print(f"\n{errors} problem(s), {warnings} warning(s). " +
          ("Ready to train." if not errors else "Fix the problems above before training."))
    return 1 if errors else 0
