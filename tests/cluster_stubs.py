"""Stand-ins for the stock commands and SLURM's, so the generated scripts run in milliseconds.

Each stub appends ``<name> <arguments>`` to ``$STUB_LOG`` and its exact argument list to
``$STUB_LOG.argv`` (:func:`stub_argv`: one list per call, so a test can see that a value arrived as
one intact argument), and writes what the real command leaves behind where the scripts look for it
(preprocessed folder and plans, a trained fold). A stub fails with status 3 when ``STUB_FAIL``
names it (``nnUNetv2_train`` or ``nnUNetv2_train:<fold>``). With ``STUB_SHOW_ENV=NAME`` every stub
also records the value of ``$NAME`` it sees (:func:`stub_env_values`).

``sbatch`` reads the ``#SBATCH`` lines of the script it is given as sbatch does
(:func:`sbatch_directives`, a port of the grammar in Slurm's ``src/sbatch/opt.c``), records them
(:func:`sbatch_submissions`) and prints a job id; ``srun`` and ``scontrol`` only record.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DATASET_ID = 17
DATASET_NAME = "Dataset017_Stub"

_PRELUDE = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
{ printf '%s\\0' "$(basename "$0")" "$@"; printf '\\n'; } >> "$STUB_LOG.argv"
if [[ -n "${STUB_SHOW_ENV:-}" ]]; then printf '%s\\0\\n' "${!STUB_SHOW_ENV-<unset>}" >> "$STUB_LOG.env"; fi
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
    "srun": "",
}

# sbatch: record the call and the script's #SBATCH arguments as sbatch reads them, print "<id>;<cluster>"
_SBATCH = """#!%s
import json, os, sys
sys.path.insert(0, %r)
from cluster_stubs import sbatch_directives
log = os.environ["STUB_LOG"] + ".sbatch"
count = sum(1 for _ in open(log)) if os.path.exists(log) else 0
script = sys.argv[-1]
with open(script) as opened:
    directives = sbatch_directives(opened.read())
with open(log, "a") as out:
    out.write(json.dumps({"argv": sys.argv[1:], "script": script, "directives": directives}) + "\\n")
print(f"{1001 + count};cluster1")
""" % (sys.executable, str(Path(__file__).parent))


def make_stub_bin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in STUBS.items():
        path = folder / name
        path.write_text(_PRELUDE + body)
        path.chmod(0o755)
    (folder / "sbatch").write_text(_SBATCH)
    (folder / "sbatch").chmod(0o755)
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


def stub_argv(env: dict) -> list[list[str]]:
    """Every stub call as its exact argument list, the command's name first."""
    log = Path(env["STUB_LOG"] + ".argv")
    if not log.is_file():
        return []
    records = log.read_bytes().decode().split("\0\n")
    return [record.split("\0") for record in records if record]


def stub_env_values(env: dict) -> list[str]:
    """The value of ``$STUB_SHOW_ENV`` that each stub call saw."""
    log = Path(env["STUB_LOG"] + ".env")
    return [v for v in log.read_bytes().decode().split("\0\n") if v] if log.is_file() else []


def sbatch_submissions(env: dict) -> list[dict]:
    """Each sbatch call: ``argv``, ``script`` and the script's ``directives`` (#SBATCH arguments)."""
    log = Path(env["STUB_LOG"] + ".sbatch")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale


def sbatch_arguments(rest: str) -> list[str]:
    """The arguments sbatch reads from what follows ``#SBATCH`` on a line (``get_argument`` in Slurm's
    src/sbatch/opt.c, called until it returns nothing): unquoted whitespace separates arguments,
    '...' and "..." group, a backslash escapes the next character, an unescaped # outside quotes
    ends the line, and an argument of nothing (e.g. "") ends the line too."""
    arguments, i = [], 0
    while True:
        while i < len(rest) and rest[i] in _C_SPACE:
            i += 1
        argument, quote, escaped = [], "", False
        while i < len(rest) and (quote or rest[i] not in _C_SPACE):
            character = rest[i]
            if escaped:
                escaped = False
            elif character == "\\":
                escaped, i = True, i + 1
                continue
            elif quote:
                if character == quote:
                    quote, i = "", i + 1
                    continue
            elif character in "\"'":
                quote, i = character, i + 1
                continue
            elif character == "#":
                break
            argument.append(character)
            i += 1
        if quote:
            raise ValueError(f"sbatch: unmatched {quote} in {rest!r}")
        if not argument:
            return arguments
        arguments.append("".join(argument))


def sbatch_directives(script: str) -> list[str]:
    """All ``#SBATCH`` arguments of a batch script as sbatch reads them, up to its first command.

    A line holding ``hetjob``/``packjob`` (any case) would start another job component: it shows
    up as the argument ``<HETJOB SEPARATOR>``."""
    arguments: list[str] = []
    for line in script.split("\n")[1:]:
        if line.startswith("#SBATCH"):
            if "hetjob" in line.lower() or "packjob" in line.lower():
                arguments.append("<HETJOB SEPARATOR>")
                continue
            arguments += sbatch_arguments(line[len("#SBATCH"):])
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return arguments
