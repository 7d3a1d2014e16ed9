"""The job description of ``nnunet-ext slurm``: a flat JSON plan file and/or command-line flags.

One key per option, named like its flag (``--partition-gpu`` <-> ``"partition_gpu"``), so a plan
file and a command line say the same thing in the same words; flags given next to a file override
its keys. Everything is checked here, before any script is written, and each error names the key
(and the file, or the flag it came from) and says what to write instead. That includes what could
break a generated script: text that cannot stand on one line, and ``#SBATCH`` values that sbatch
would not read back as written (see :mod:`nnunet_ext.cluster.quoting`). YAML would need PyYAML,
which nnunet-ext does not depend on: a ``.yaml`` file is read only where ``yaml`` happens to be
importable, otherwise the error shows the JSON equivalent to write.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from nnunet_ext.challenges.registry import names as challenge_names
from nnunet_ext.cluster.quoting import check_sbatch_name, check_text, show
from nnunet_ext.errors import UserFacingError

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
CASCADE = "3d_cascade_fullres"
CHALLENGES = tuple(challenge_names())  # the challenge registry: nnunet_ext/challenges/registry.py
DEVICES = ("cuda", "cpu")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_MEM = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass(frozen=True)
class JobSpec:
    """Everything the workflow needs; defaults are those of the stock nnU-Net commands where one exists."""

    dataset: int | str
    configurations: tuple[str, ...] = ("3d_fullres",)
    trainers: tuple[str, ...] = ("nnUNetTrainer",)
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    plans: str = "nnUNetPlans"
    planner: str | None = None
    preprocess_unlabeled: bool = False
    device: str = "cuda"
    gpus_per_job: int = 1
    npz: bool = True
    ensembling: bool = True
    num_processes: int = 8
    predict_input: str | None = None
    predict_output: str | None = None
    submit_challenge: str | None = None
    submit_task: str | None = None
    submit_output: str | None = None
    # SLURM
    account: str | None = None
    partition_cpu: str | None = None
    partition_gpu: str | None = None
    time_preprocess: str = "12:00:00"
    time_train: str = "48:00:00"
    time_find_best: str = "04:00:00"
    time_predict: str = "08:00:00"
    time_submit: str = "01:00:00"
    mem: str | None = "32G"
    mem_train: str | None = None
    cpus: int = 8
    cpus_per_gpu: int = 8
    gres: str = "gpu"
    max_parallel: int | None = None
    max_requeues: int = 20
    requeue_signal_seconds: int = 300
    sbatch_extra: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    job_prefix: str | None = None

    @property
    def prefix(self) -> str:
        return self.job_prefix or f"nnx{self.dataset}"

    def to_json(self) -> dict:
        """The plan file that describes this spec (every key, defaults included)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "environment":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


KEYS = tuple(f.name for f in fields(JobSpec))
_LIST_KEYS = {"configurations", "trainers", "folds", "sbatch_extra", "setup"}
_INT_KEYS = {"gpus_per_job", "num_processes", "cpus", "cpus_per_gpu", "max_parallel", "max_requeues",
             "requeue_signal_seconds"}
_BOOL_KEYS = {"preprocess_unlabeled", "npz", "ensembling"}

EXAMPLE_PLAN = {
    "dataset": 17,
    "configurations": ["3d_fullres", "3d_lowres"],
    "trainers": ["nnUNetExtTrainer", "BANetTrainer"],
    "folds": [0, 1, 2, 3, 4],
    "plans": "nnUNetPlans",
    "account": "my_project",
    "partition_cpu": "cpu",
    "partition_gpu": "gpu",
    "gpus_per_job": 1,
    "time_train": "48:00:00",
    "mem": "64G",
    "setup": ["module load cuda/12.1", "source $HOME/venvs/nnunet/bin/activate"],
    "predict_input": "/data/nnUNet_raw/Dataset017_BTCV/imagesTs",
    "predict_output": "/data/predictions/Dataset017",
}


# keys whose flag is not --<key with dashes>
_FLAGS = {"dataset": "-d", "configurations": "-c", "trainers": "-tr", "folds": "-f", "plans": "-p",
          "planner": "-pl", "num_processes": "-np", "device": "-device", "environment": "--env", "npz": "--no-npz",
          "ensembling": "--disable-ensembling"}
# keys written into #SBATCH lines, with an example of a good value for the errors
_SBATCH_KEYS = {"account": "my_project", "partition_cpu": "cpu", "partition_gpu": "gpu", "gres": "gpu:a100"}

Where = Callable[[str], str]


def _flag(key: str) -> str:
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def _where(source: str | None, key: str) -> str:
    return f"{key!r} in {source}" if source else f"{_flag(key)}"


def _locator(source: str | None, flags: Collection[str]) -> Where:
    """Names a key in errors: the flag where it came from the command line, else the file's key."""
    return lambda key: _where(None if key in flags else source, key)


def read_plan_file(path: str | os.PathLike) -> dict:
    """A plan file's keys (JSON; YAML only where PyYAML is installed). Errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"plan file {path} does not exist. Write one as JSON, e.g.\n"
                              f"{json.dumps(EXAMPLE_PLAN, indent=2)}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional: nnunet-ext does not depend on PyYAML
        except ImportError:
            raise UserFacingError(
                f"{path} is YAML, which needs PyYAML (not a dependency of nnunet-ext). Write the same keys as JSON "
                f"(e.g. {path.with_suffix('.json').name}), for example:\n{json.dumps(EXAMPLE_PLAN, indent=2)}\n"
                f"or `pip install pyyaml` to read YAML.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UserFacingError(f"{path} is not valid YAML: {error}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserFacingError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                                  f"{error.colno}. The plan is one JSON object, e.g. {{\"dataset\": 17, "
                                  f"\"trainers\": [\"nnUNetExtTrainer\"]}}.") from None
    if not isinstance(data, dict):
        raise UserFacingError(f"{path} must hold one object of keys (e.g. {{\"dataset\": 17}}), not "
                              f"{type(data).__name__}.")
    return data


def build_spec(values: Mapping[str, Any], source: str | None = None, flags: Collection[str] = ()) -> JobSpec:
    """Check the plan's keys and values and make the spec; ``source`` (a file name) goes into errors,
    except for the keys in ``flags`` (given on the command line), which errors name by their flag."""
    unknown = [key for key in values if key not in KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, KEYS, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UserFacingError(f"unknown key {key!r}{' in ' + source if source else ''}.{hint} Known keys: "
                              f"{', '.join(KEYS)} (see the docs, reference/slurm-plan).")
    if values.get("dataset") in (None, ""):
        raise UserFacingError("the dataset is missing: give -d ID (or \"dataset\": 17 in the plan file).")
    where = _locator(source, flags)
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        clean[key] = _coerce(key, value, where(key))
    spec = JobSpec(**clean)
    _check_script_text(spec, where)
    _check(spec, where)
    return spec


def _coerce(key: str, value: Any, where: str) -> Any:
    if key == "dataset":
        if isinstance(value, bool):
            raise UserFacingError(f"{where} must be a dataset id (17) or name (Dataset017_BTCV), not {value!r}.")
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            number = int(value)
            if not 1 <= number <= 999:
                raise UserFacingError(f"{where}: dataset id {number} is outside nnU-Net's 1..999.")
            return number
        if isinstance(value, str) and re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", value):
            return value
        raise UserFacingError(f"{where} must be a dataset id (17) or name (Dataset017_BTCV), not {value!r}.")
    if key in _LIST_KEYS:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value and key not in ("sbatch_extra", "setup"):
            raise UserFacingError(f"{where} must be a non-empty list, e.g. "
                                  f"{json.dumps(EXAMPLE_PLAN.get(key, ['...']))}.")
        if key == "folds":
            if any(isinstance(v, bool) or not (isinstance(v, int) or str(v).isdigit()) for v in value):
                raise UserFacingError(f"{where} must be whole numbers such as [0, 1, 2, 3, 4], got {value!r}.")
            value = [int(v) for v in value]
        elif any(not isinstance(v, str) or not v.strip() for v in value):
            raise UserFacingError(f"{where} must be a list of non-empty strings, got {value!r}.")
        if len(set(value)) != len(value):
            raise UserFacingError(f"{where} lists an entry twice: {value!r}.")
        return tuple(value)
    if key in _INT_KEYS:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
            raise UserFacingError(f"{where} must be a whole number, got {value!r}.")
        value = int(value)
        if value < (0 if key in ("max_requeues",) else 1):
            raise UserFacingError(f"{where} must be at least {0 if key == 'max_requeues' else 1}, got {value}.")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise UserFacingError(f"{where} must be true or false, got {value!r}.")
        return value
    if key == "environment":
        if not isinstance(value, dict):
            raise UserFacingError(f"{where} must be an object of variable names to values, e.g. "
                                  f"{{\"nnUNet_n_proc_DA\": \"12\"}}, got {value!r}.")
        for name, text in value.items():
            if not _ENV_NAME.fullmatch(str(name)) or isinstance(text, (dict, list)) or text is None:
                raise UserFacingError(f"{where}: {name!r}: {text!r} is not a variable name with a value; names are "
                                      f"letters, digits and '_' (not starting with a digit), e.g. "
                                      f"nnUNet_n_proc_DA=12.")
        return tuple((str(name), str(text)) for name, text in value.items())
    if not isinstance(value, str) or not value.strip():
        raise UserFacingError(f"{where} must be a non-empty string, got {value!r}.")
    check_text(where, value)  # before strip(): a trailing line break is refused, not silently dropped
    return value.strip()


def _check(spec: JobSpec, where: Where) -> None:
    """Checks that need several keys, or the values' meaning."""
    def fail(key: str, message: str) -> None:
        raise UserFacingError(f"{where(key)}: {message}")

    for configuration in spec.configurations:
        if configuration not in CONFIGURATIONS:
            close = difflib.get_close_matches(configuration, CONFIGURATIONS, n=1)
            fail("configurations", f"unknown configuration {configuration!r}"
                 f"{' (did you mean ' + repr(close[0]) + '?)' if close else ''}; nnU-Net's are "
                 f"{', '.join(CONFIGURATIONS)}.")
    if CASCADE in spec.configurations and "3d_lowres" not in spec.configurations:
        fail("configurations", f"{CASCADE} trains on the predictions of 3d_lowres; add 3d_lowres to the "
                               f"configurations (it is trained first).")
    if any(fold < 0 for fold in spec.folds):
        fail("folds", f"folds are 0..N-1, got {list(spec.folds)}.")
    if spec.device not in DEVICES:
        fail("device", f"must be one of {', '.join(DEVICES)} (nnUNetv2_train -device), got {spec.device!r}.")
    if spec.gpus_per_job > 1 and spec.device != "cuda":
        fail("gpus_per_job", f"nnU-Net's multi-GPU training (-num_gpus {spec.gpus_per_job}) runs on CUDA only; "
                             f"use device cuda or gpus_per_job 1.")
    if spec.ensembling and not spec.npz:
        fail("ensembling", "ensembling needs the validation probabilities (npz); set \"npz\": true or "
                           "\"ensembling\": false (--disable-ensembling).")
    if spec.planner is not None and spec.plans == "nnUNetPlans":
        fail("plans", f"with planner {spec.planner!r} give the plans identifier it should write (e.g. -p "
                      f"{spec.planner}Plans, or nnUNetPlans_CoTr for CoTrPlanner), so nnU-Net's default "
                      f"nnUNetPlans is not overwritten.")
    if (spec.predict_input is None) != (spec.predict_output is None):
        fail("predict_input" if spec.predict_input is None else "predict_output",
             "give both predict_input (the test images, e.g. imagesTs) and predict_output, or neither.")
    if spec.submit_challenge is not None:
        if spec.submit_challenge not in CHALLENGES:
            fail("submit_challenge", f"must be one of {', '.join(CHALLENGES)}, got {spec.submit_challenge!r}.")
        if spec.predict_output is None:
            fail("submit_challenge", "a submission is exported from the predictions: also give predict_input "
                                     "and predict_output.")
        if spec.submit_output is None:
            fail("submit_output", "give the folder to write the submission into.")
        if spec.submit_challenge == "segrap2023" and spec.submit_task not in ("oar", "gtv"):
            fail("submit_task", "segrap2023 needs \"submit_task\": \"oar\" or \"gtv\".")
        if spec.submit_challenge == "amos22":
            if spec.submit_task not in ("1", "2"):
                fail("submit_task", "amos22 needs \"submit_task\": \"1\" or \"2\" (the challenge's task).")
            if not str(spec.submit_output).endswith(".zip"):
                fail("submit_output", "AMOS22 takes one zip (results/amos_XXXX.nii.gz): give a path ending in .zip.")
    elif spec.submit_output is not None or spec.submit_task is not None:
        fail("submit_challenge", "submit_output/submit_task need submit_challenge (kits21, amos22, segrap2023).")
    for key in ("time_preprocess", "time_train", "time_find_best", "time_predict", "time_submit"):
        if not _TIME.fullmatch(getattr(spec, key)):
            fail(key, f"{getattr(spec, key)!r} is not a SLURM time; write HH:MM:SS (48:00:00) or D-HH:MM:SS.")
    for key in ("mem", "mem_train"):
        value = getattr(spec, key)
        if value is not None and not _MEM.fullmatch(value):
            fail(key, f"{value!r} is not a SLURM memory size; write e.g. 64G or 64000M.")
    for line in spec.sbatch_extra:
        if not line.startswith("--"):
            fail("sbatch_extra", f"{line!r}: each entry is one sbatch option starting with --, e.g. --qos=long.")
    if spec.job_prefix is not None and not _JOB_NAME.fullmatch(spec.job_prefix):
        fail("job_prefix", f"{spec.job_prefix!r}: use letters, digits, '_', '-' or '.'.")
    if spec.max_parallel is not None and spec.max_parallel < 1:
        fail("max_parallel", "must be at least 1.")


def _check_script_text(spec: JobSpec, where: Where) -> None:
    """Every value that reaches a generated script, checked for what the script could not carry.

    Values that bash gets are quoted there (any printable text is fine); ``#SBATCH`` values are
    read by sbatch, which has no quoting we rely on for names. The ``setup`` lines are shell by
    design (module loads, venv activation): they go verbatim into their own file, so only what
    would split or hide a line is refused (a tab is fine there).
    """
    for f in fields(spec):
        value = getattr(spec, f.name)
        if f.name == "environment":
            for name, text in value:
                check_text(f"{where(f.name)} ({name})", text)
        elif f.name == "setup":
            for line in value:
                if "\n" in line or "\r" in line:
                    raise UserFacingError(f"{where(f.name)}: {show(line)} holds a line break; give one shell line "
                                          f"per list entry (split it into several entries).")
                check_text(where(f.name), line, allow_tab=True)
        elif isinstance(value, str):
            check_text(where(f.name), value)
        elif isinstance(value, tuple):
            for item in value:
                check_text(where(f.name), str(item))
    for key, example in _SBATCH_KEYS.items():
        if getattr(spec, key) is not None:
            check_sbatch_name(where(key), getattr(spec, key), example)
    for option in spec.sbatch_extra:
        check_sbatch_name(where("sbatch_extra"), option, "--qos=long")
    # the job names (<prefix>-<step>) are #SBATCH values too; the default prefix holds the dataset
    check_sbatch_name(where("job_prefix" if spec.job_prefix else "dataset"), spec.prefix, "nnx17")
