"""Run a workflow's sbatch scripts on this machine, one after the other: the DAG without SLURM.

The very scripts ``submit_all.sh`` would submit are run with bash (as an argument list: no shell
parses the jobs folder's path), array steps once per task with
``SLURM_ARRAY_TASK_ID`` set, in the DAG's order (each step after the ones it waits for). Output is
streamed and also kept in ``<jobs>/logs/local_<step>[_<task>].log``. The first failing task stops
the run with a message naming the step, the task, the exit status and the log. Running again
skips what is finished: the scripts themselves skip a preprocessed dataset (``state/`` marker) and
trained folds (``checkpoint_final.pth`` + validation), and resume an interrupted fold with ``--c``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

from nnunet_ext.cluster.slurm import LOGS, script_name
from nnunet_ext.cluster.workflow import Step, Workflow


class StepFailed(Exception):
    """A step's script exited non-zero; the message says which, where its log is, and how to continue."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def ordered_steps(workflow: Workflow, from_step: str | None = None) -> list[Step]:
    """The steps in an order that respects ``after`` (checked), from ``from_step`` on."""
    seen: set[str] = set()
    for step in workflow.steps:
        missing = [name for name in step.after if name not in seen]
        if missing:
            raise ValueError(f"step {step.name} waits for {missing}, which do not come before it")
        seen.add(step.name)
    steps = list(workflow.steps)
    if from_step is not None:
        names = [s.name for s in steps]
        if from_step not in names:
            raise ValueError(f"no step {from_step!r}; the steps are {', '.join(names)}")
        steps = steps[names.index(from_step):]
    return steps


def run_local(workflow: Workflow, jobs_dir: str | os.PathLike, env: Mapping[str, str] | None = None,
              from_step: str | None = None, out: Callable[[str], None] | None = None) -> None:
    """Run every step (every array task) in order; raise :class:`StepFailed` at the first failure."""
    jobs_dir = Path(jobs_dir).absolute()
    write = out or _print
    environment = dict(os.environ if env is None else env)
    environment["NNUNET_EXT_LOCAL"] = "1"  # the scripts skip the cluster set-up and requeue logic
    # the stock commands of this interpreter's environment, also when it was not activated (appended:
    # whatever the user put first on PATH still wins)
    own_bin = str(Path(sys.executable).parent)
    if own_bin not in environment.get("PATH", "").split(os.pathsep):
        environment["PATH"] = os.pathsep.join(filter(None, [environment.get("PATH"), own_bin]))
    (jobs_dir / LOGS).mkdir(parents=True, exist_ok=True)
    for step in ordered_steps(workflow, from_step):
        script = jobs_dir / script_name(workflow, step)
        for task in range(step.array_size) if step.tasks else [None]:
            label = step.name if task is None else f"{step.name} task {task} ({step.task_label(task)})"
            log = jobs_dir / LOGS / (f"local_{step.name}.log" if task is None else f"local_{step.name}_{task}.log")
            task_env = dict(environment)
            task_env.pop("SLURM_ARRAY_TASK_ID", None)
            if task is not None:
                task_env["SLURM_ARRAY_TASK_ID"] = str(task)
            write(f"=== nnunet-ext local: {label}\n")
            status = _run_streamed(["bash", str(script)], task_env, log, write)
            if status != 0:
                raise StepFailed(f"step {label} failed with exit status {status}; its output is in {log}. Fix the "
                                 f"cause and run the same command again: finished steps and folds are skipped, an "
                                 f"interrupted fold resumes from its checkpoint.", status)
    write("=== nnunet-ext local: all steps finished\n")


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_streamed(command: list[str], env: dict[str, str], log: Path, write: Callable[[str], None]) -> int:
    """Run in its own session, streaming lines to ``write`` and ``log``; Ctrl-C ends the whole session.

    The log is written as the step runs (to be followed while it runs), so it is not an atomic write:
    it is a record of this run, replaced by the next run of the same task, never an input of a step.
    """
    with log.open("w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1, start_new_session=True)
        assert process.stdout is not None  # stdout=PIPE
        try:
            for line in process.stdout:
                write(line)
                log_file.write(line)
            return process.wait()
        except KeyboardInterrupt:
            os.killpg(process.pid, signal.SIGTERM)  # the step's processes only (its own session)
            process.wait()
            raise
