"""Stand-ins for the stock commands, so the generated scripts run in milliseconds.

Each stub appends ``<name> <arguments>`` to ``$STUB_LOG`` and writes what the real command leaves
behind where the scripts look for it (preprocessed folder and plans, a trained fold). A stub fails
with status 3 when ``STUB_FAIL`` names it (``nnUNetv2_train`` or ``nnUNetv2_train:<fold>``).
"""
from __future__ import annotations

import os
from pathlib import Path

DATASET_ID = 17
DATASET_NAME = "Dataset017_Stub"

_PRELUDE = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [[ "${STUB_FAIL:-}" == "$(basename "$0")" ]]; then echo "stub $(basename "$0") fails" >&2; exit 3; fi
"""

STUBS = {
    "nnUNetv2_plan_and_preprocess": 'mkdir -p "$nnUNet_preprocessed/%s"; echo {} > "$nnUNet_preprocessed/%s/nnUNetPlans.json"\n'
                                    % (DATASET_NAME, DATASET_NAME),
    # nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER -p PLANS ...: a finished, validated fold
    "nnUNetv2_train": """if [[ "${STUB_FAIL:-}" == "nnUNetv2_train:$3" ]]; then echo "stub training of fold $3 fails" >&2; exit 3; fi
if [[ -n "${STUB_SLEEP:-}" ]]; then echo started > "$STUB_LOG.started"; sleep "$STUB_SLEEP"; fi
d="$nnUNet_results/%s/${5}__${7}__${2}/fold_${3}"
mkdir -p "$d/validation"; touch "$d/checkpoint_final.pth" "$d/validation/summary.json" "$d/validation/case.npz"
""" % DATASET_NAME,
    "nnUNetv2_find_best_configuration": "",
    "python": "",
    "nnunet-ext": "",
    "scontrol": "",
}


def make_stub_bin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in STUBS.items():
        path = folder / name
        path.write_text(_PRELUDE + body)
        path.chmod(0o755)
    return folder


def stub_env(tmp_path: Path, **extra: str) -> dict:
    """Environment for running generated scripts against the stubs, outside SLURM."""
    bin_dir = make_stub_bin(tmp_path / "stub_bin")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "STUB_LOG": str(tmp_path / "stub.log"),
                "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
                "nnUNet_results": str(tmp_path / "results")})
    env.update(extra)
    return env


def stub_calls(env: dict) -> list[str]:
    log = Path(env["STUB_LOG"])
    return log.read_text().splitlines() if log.is_file() else []


def fold_dir(env: dict, trainer: str, configuration: str, fold: int, plans: str = "nnUNetPlans") -> Path:
    return Path(env["nnUNet_results"], DATASET_NAME, f"{trainer}__{plans}__{configuration}", f"fold_{fold}")
