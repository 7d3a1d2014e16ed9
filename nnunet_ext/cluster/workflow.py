"""The nnU-Net workflow as a small DAG of steps, built once from a :class:`JobSpec`.

Both writers use it: :mod:`nnunet_ext.cluster.slurm` turns each step into one sbatch script (an
array job where the step has tasks) chained by ``--dependency=afterok``, and
:mod:`nnunet_ext.cluster.local` runs those same scripts one after the other. A step's ``body`` is
bash: the commands a user would type (stock ``nnUNetv2_*`` and ``nnunet-ext``), plus the checks that
make a step safe to run again (training resumes with ``--c``, a finished fold is skipped). Every
value from the plan is one bash word quoted with ``shlex.quote`` (:mod:`nnunet_ext.cluster.quoting`);
values the script only knows at run time (trainer, fold of an array task) are variables expanded
inside double quotes, never text pasted into a quoted string.

    preprocess (CPU) -> train (GPU array: trainer x configuration x fold) [-> train_cascade]
      -> find_best (CPU) [-> predict (GPU) [-> submit (CPU)]]
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from nnunet_ext.cluster.quoting import check_text, shell_command, shell_word
from nnunet_ext.cluster.spec import CASCADE, NNUNET_PATH_VARIABLES, JobSpec


@dataclass(frozen=True)
class Resources:
    """What a step asks the scheduler for; the local runner ignores it."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus: int = 1
    gpus: int = 0
    gres: str = "gpu"


@dataclass(frozen=True)
class Step:
    """One node of the DAG: bash lines, resources, the steps it waits for, and its array tasks.

    ``tasks`` is empty for a single job; otherwise task ``i`` sets the variables ``tasks[i]``
    (e.g. TRAINER, CONFIGURATION, FOLD) before ``body`` runs, from ``SLURM_ARRAY_TASK_ID``.
    """

    name: str
    description: str
    body: tuple[str, ...]
    resources: Resources
    after: tuple[str, ...] = ()
    tasks: tuple[tuple[tuple[str, str], ...], ...] = ()
    requeue: bool = False

    @property
    def array_size(self) -> int:
        return len(self.tasks)

    def task_label(self, index: int) -> str:
        return ", ".join(f"{k.lower()} {v}" for k, v in self.tasks[index])


@dataclass(frozen=True)
class Workflow:
    spec: JobSpec
    steps: tuple[Step, ...]
    environment: tuple[tuple[str, str], ...] = field(default=())

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


def training_tasks(spec: JobSpec, configurations: Sequence[str]) -> tuple[tuple[tuple[str, str], ...], ...]:
    """One task per (trainer, configuration, fold), trainer-major: the order of the array indices."""
    return tuple((("TRAINER", t), ("CONFIGURATION", c), ("FOLD", str(f)))
                 for t in spec.trainers for c in configurations for f in spec.folds)


def _train_body(spec: JobSpec) -> tuple[str, ...]:
    """Train one fold, safe to run again: done -> skip; final checkpoint -> validation only; latest -> --c.

    nnU-Net 2.8's ``--c`` falls back to a fresh start (with a warning) when no checkpoint exists,
    but it reloads ``checkpoint_final`` and re-runs validation for a finished fold; deciding here
    keeps finished folds untouched and logs what happens.
    """
    npz = ["--npz"] if spec.npz else []
    fold_dir = '"$nnUNet_results/$(dataset_name)/${TRAINER}__${PLANS}__${CONFIGURATION}/fold_${FOLD}"'
    done = '[[ -f "$FOLD_DIR/checkpoint_final.pth" && -f "$FOLD_DIR/validation/summary.json" ]]'
    if spec.npz:
        done += ' && compgen -G "$FOLD_DIR/validation/*.npz" > /dev/null'
    train = " ".join(["nnUNetv2_train", '"$DATASET"', '"$CONFIGURATION"', '"$FOLD"', '-tr "$TRAINER"', '-p "$PLANS"',
                      shell_command("-num_gpus", spec.gpus_per_job, "-device", spec.device, *npz)])
    return (
        f"PLANS={shell_word(spec.plans)}",
        f"FOLD_DIR={fold_dir}",
        f"if {done}; then",
        '    echo "nnunet-ext: $TRAINER $CONFIGURATION fold $FOLD is trained and validated ($FOLD_DIR); skipping"',
        "    exit 0",
        "fi",
        'MODE=""',
        'if [[ -f "$FOLD_DIR/checkpoint_final.pth" ]]; then',
        '    MODE="--val"; echo "nnunet-ext: training finished, running the validation only"',
        'elif [[ -f "$FOLD_DIR/checkpoint_latest.pth" ]]; then',
        '    MODE="--c"; echo "nnunet-ext: resuming from $FOLD_DIR/checkpoint_latest.pth"',
        "fi",
        f"run_requeueable {train} $MODE",
    )


def _preprocess_body(spec: JobSpec) -> tuple[str, ...]:
    # the cascade trains on 3d_fullres data; preprocessing it again would only repeat 3d_fullres
    configurations = list(dict.fromkeys("3d_fullres" if c == CASCADE else c for c in spec.configurations))
    if spec.planner is None:
        command = shell_command("nnUNetv2_plan_and_preprocess", "-d", spec.dataset, "-c", *configurations,
                       "-np", spec.num_processes, "--verify_dataset_integrity")
    else:
        command = shell_command("nnunet-ext", "plan", "-d", spec.dataset, "-pl", spec.planner, "-c", *configurations,
                       "-np", spec.num_processes, "-overwrite_plans_name", spec.plans, "--verify_dataset_integrity")
    lines = [command]
    if spec.preprocess_unlabeled:
        lines.append(shell_command("nnunet-ext", "preprocess-unlabeled", "-d", spec.dataset, "-c", *configurations,
                          "-p", spec.plans, "-np", spec.num_processes))
    # the marker lets a re-submitted or re-run workflow skip this (hours on a large dataset)
    return (shell_command("skip_if_done", f"{spec.plans}.json"), *lines, "mark_done")


def build_workflow(spec: JobSpec, environ: Mapping[str, str] | None = None) -> Workflow:
    """The DAG for ``spec``. nnU-Net's folder variables come from ``spec.environment``, else ``environ``."""
    variables: Mapping[str, str] = os.environ if environ is None else environ
    env = dict(spec.environment)
    for name in NNUNET_PATH_VARIABLES:
        if name not in env and variables.get(name):
            env[name] = check_text(f"environment variable {name} (exported in every job)",
                                   os.path.abspath(variables[name]))
    # each step's resources are one of these with its time (and, for the GPU steps, memory and counts)
    cpu = Resources(partition=spec.partition_cpu, account=spec.account, mem=spec.mem, cpus=spec.cpus)
    gpu = Resources(partition=spec.partition_gpu, account=spec.account, gres=spec.gres)
    gpu_for = (lambda n: n) if spec.device == "cuda" else (lambda n: 0)

    steps = [Step("preprocess", "plan and preprocess the dataset", _preprocess_body(spec),
                  replace(cpu, time=spec.time_preprocess))]
    train_resources = replace(gpu, time=spec.time_train, mem=spec.mem_train or spec.mem,
                              cpus=spec.cpus_per_gpu * spec.gpus_per_job, gpus=gpu_for(spec.gpus_per_job))
    plain = [c for c in spec.configurations if c != CASCADE]
    steps.append(Step("train", f"train {len(spec.trainers)} trainer(s) x {len(plain)} configuration(s) x "
                               f"{len(spec.folds)} fold(s), one fold per task", _train_body(spec), train_resources,
                      after=("preprocess",), tasks=training_tasks(spec, plain), requeue=True))
    last_training = "train"
    if CASCADE in spec.configurations:
        steps.append(Step("train_cascade", "train 3d_cascade_fullres on the 3d_lowres predictions",
                          _train_body(spec), train_resources, after=("train",),
                          tasks=training_tasks(spec, [CASCADE]), requeue=True))
        last_training = "train_cascade"
    find_best = shell_command("nnUNetv2_find_best_configuration", spec.dataset, "-c", *spec.configurations,
                     "-tr", *spec.trainers, "-p", spec.plans, "-f", *spec.folds, "-np", spec.num_processes)
    if not spec.ensembling:
        find_best += " --disable_ensembling"
    steps.append(Step("find_best", "cross-validation results, best model or ensemble, postprocessing",
                      (find_best,), replace(cpu, time=spec.time_find_best), after=(last_training,)))
    if spec.predict_input is not None:
        assert spec.predict_output is not None, "build_spec refuses predict_input without predict_output"
        predict_output = os.path.abspath(spec.predict_output)
        predict = shell_command("python", "-m", "nnunet_ext.cluster.predict_best", "-d", spec.dataset,
                       "-i", os.path.abspath(spec.predict_input), "-o", predict_output,
                       "-device", spec.device, "-np", spec.num_processes)
        steps.append(Step("predict", "predict with the best model or ensemble, then its postprocessing", (predict,),
                          replace(gpu, time=spec.time_predict, mem=spec.mem, cpus=spec.cpus_per_gpu,
                                  gpus=gpu_for(1)), after=("find_best",)))
        if spec.submit_challenge is not None:
            assert spec.submit_output is not None, "build_spec refuses submit_challenge without submit_output"
            submit = ["nnunet-ext", "submit", spec.submit_challenge, predict_output,
                      os.path.abspath(spec.submit_output), "--images", os.path.abspath(spec.predict_input)]
            if spec.submit_task:
                submit += ["--task", spec.submit_task]
            steps.append(Step("submit", f"{spec.submit_challenge} submission files, validated",
                              (shell_command(*submit),), replace(cpu, time=spec.time_submit), after=("predict",)))
    return Workflow(spec, tuple(steps), tuple(env.items()))
