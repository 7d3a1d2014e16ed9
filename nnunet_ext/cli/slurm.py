"""``nnunet-ext slurm``: the whole nnU-Net workflow as SLURM batch jobs, or run here without SLURM.

``nnunet-ext slurm plan.json`` (and/or flags) writes one sbatch script per step into ``--out``
plus ``submit_all.sh``, which submits them chained by dependencies: plan+preprocess (CPU) ->
trainers x configurations x folds (GPU job array, requeue-safe) -> find_best_configuration ->
predict (+ ensemble, postprocessing) -> submission export. ``--dry-run`` prints instead of
writing, ``--submit`` also runs ``submit_all.sh``, ``--local`` runs the same scripts here in order.
Writing and ``--local`` hold a lock on the jobs folder: a second run on the same folder waits, then
is refused with a message.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from nnunet_ext.errors import UserFacingError

DEFAULT_OUT = "nnunet_ext_jobs"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "slurm", help="sbatch scripts for the whole workflow (plan -> train array -> best config -> predict -> "
                      "submit), or --local to run it here",
        description="Writes SLURM batch scripts for the nnU-Net workflow: plan+preprocess (CPU partition), one GPU "
                    "array task per trainer x configuration x fold (requeue-safe: a requeued or re-run fold resumes "
                    "with --c; multi-GPU via -num_gpus), nnUNetv2_find_best_configuration, prediction with the best "
                    "model or ensemble, and a challenge submission. The job description is a JSON plan file (keys "
                    "named like the flags: --partition-gpu <-> \"partition_gpu\"; see the docs, reference/slurm-plan) "
                    "and/or flags; flags "
                    "override the file.",
        epilog="Then: bash OUT/submit_all.sh (or --submit). Without SLURM: the same command with --local.")
    parser.add_argument("plan", nargs="?", default=None, metavar="PLAN.json", help="job description (JSON)")
    group = parser.add_argument_group("workflow")
    group.add_argument("-d", dest="dataset", default=None, metavar="ID", help="dataset id or name")
    group.add_argument("-c", dest="configurations", nargs="+", default=None, metavar="CONFIG",
                       help="configurations (default 3d_fullres); 3d_cascade_fullres trains after 3d_lowres")
    group.add_argument("-tr", dest="trainers", nargs="+", default=None, metavar="TRAINER",
                       help="trainers (default nnUNetTrainer)")
    group.add_argument("-f", dest="folds", nargs="+", type=int, default=None, metavar="FOLD",
                       help="folds (default 0 1 2 3 4)")
    group.add_argument("-p", dest="plans", default=None, metavar="PLANS", help="plans identifier (default nnUNetPlans)")
    group.add_argument("-pl", dest="planner", default=None, metavar="PLANNER",
                       help="plan with this planner (ours or nnU-Net's, via nnunet-ext plan) and write plans -p; "
                            "default: nnUNetv2_plan_and_preprocess")
    group.add_argument("--preprocess-unlabeled", action="store_const", const=True, default=None,
                       help="also run nnunet-ext preprocess-unlabeled (semi-supervised trainers)")
    group.add_argument("-np", dest="num_processes", type=int, default=None,
                       help="processes for preprocessing, find_best, ensembling (default 8)")
    group.add_argument("-device", dest="device", default=None, choices=("cuda", "cpu"),
                       help="training and prediction device (default cuda)")
    group.add_argument("--gpus-per-job", type=int, default=None,
                       help="GPUs per training job; > 1 trains with nnU-Net's DDP (-num_gpus)")
    group.add_argument("--no-npz", dest="npz", action="store_const", const=False, default=None,
                       help="do not keep validation probabilities (implies --disable-ensembling)")
    group.add_argument("--disable-ensembling", dest="ensembling", action="store_const", const=False, default=None,
                       help="find_best_configuration without ensembles")
    group.add_argument("--predict-input", default=None, metavar="DIR", help="images to predict (e.g. imagesTs)")
    group.add_argument("--predict-output", default=None, metavar="DIR", help="folder for the final predictions")
    group.add_argument("--submit-challenge", default=None, choices=("kits21", "amos22", "segrap2023"),
                       help="export the predictions as this challenge's submission (nnunet-ext submit)")
    group.add_argument("--submit-task", default=None, choices=("oar", "gtv"), help="segrap2023 task")
    group.add_argument("--submit-output", default=None, metavar="DIR", help="folder for the submission files")
    group.add_argument("--env", dest="environment", action="append", default=None, metavar="NAME=VALUE",
                       help="export this in every job (repeatable); nnUNet_raw/_preprocessed/_results are taken "
                            "from your environment unless given")
    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--partition", default=None, help="partition of every job (or the two below)")
    slurm.add_argument("--partition-cpu", default=None, help="partition of preprocess, find_best, submit")
    slurm.add_argument("--partition-gpu", default=None, help="partition of training and prediction")
    for step, default in (("preprocess", "12:00:00"), ("train", "48:00:00"), ("find-best", "04:00:00"),
                          ("predict", "08:00:00"), ("submit", "01:00:00")):
        slurm.add_argument(f"--time-{step}", default=None, metavar="HH:MM:SS",
                           help=f"time limit of {step} (default {default})")
    slurm.add_argument("--mem", default=None, help="memory per job (default 32G)")
    slurm.add_argument("--mem-train", default=None, help="memory per training job (default --mem)")
    slurm.add_argument("--cpus", type=int, default=None, help="CPUs of CPU jobs (default 8)")
    slurm.add_argument("--cpus-per-gpu", type=int, default=None, help="CPUs per GPU of GPU jobs (default 8)")
    slurm.add_argument("--gres", default=None, help="GPU gres name (default gpu; e.g. gpu:a100)")
    slurm.add_argument("--max-parallel", type=int, default=None, help="at most this many training tasks at once")
    slurm.add_argument("--max-requeues", type=int, default=None, help="self-requeues per fold (default 20)")
    slurm.add_argument("--requeue-signal-seconds", type=int, default=None,
                       help="requeue this long before the time limit (default 300)")
    slurm.add_argument("--sbatch-extra", action="append", default=None, metavar="--OPTION=VALUE",
                       help="extra #SBATCH option for every job (repeatable), e.g. --sbatch-extra=--qos=long")
    slurm.add_argument("--setup", action="append", default=None, metavar="LINE",
                       help="shell line run first in every job (repeatable), e.g. 'module load cuda'")
    slurm.add_argument("--job-prefix", default=None, help="job name prefix (default nnx<dataset>)")
    action = parser.add_argument_group("what to do")
    action.add_argument("--out", default=None, metavar="DIR", help=f"folder for the scripts (default {DEFAULT_OUT})")
    what = action.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="print the scripts; write nothing")
    what.add_argument("--submit", action="store_true", help="write the scripts and run submit_all.sh")
    what.add_argument("--local", action="store_true",
                      help="write the scripts and run them here, in order, without SLURM")
    action.add_argument("--from", dest="from_step", default=None, metavar="STEP",
                        help="with --local: start at this step (e.g. find_best)")
    parser.set_defaults(run=run)


def values_from_arguments(args: argparse.Namespace) -> dict:
    """Plan keys set by flags (None = not given), ready to override a plan file's."""
    from nnunet_ext.cluster.spec import KEYS

    values = {key: getattr(args, key) for key in KEYS if getattr(args, key, None) is not None}
    if args.partition is not None:
        values.setdefault("partition_cpu", args.partition)
        values.setdefault("partition_gpu", args.partition)
    if args.environment is not None:
        environment = {}
        for item in args.environment:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise UserFacingError(f"--env {item!r}: write NAME=VALUE, e.g. --env nnUNet_n_proc_DA=12.")
            environment[name] = value
        values["environment"] = environment
    if values.get("npz") is False and "ensembling" not in values:
        values["ensembling"] = False
    return values


def load_spec(args: argparse.Namespace):
    from nnunet_ext.cluster.spec import build_spec, read_plan_file

    values = read_plan_file(args.plan) if args.plan else {}
    if values.get("npz") is False and "ensembling" not in values:
        values["ensembling"] = False
    flags = values_from_arguments(args)
    values.update(flags)
    return build_spec(values, source=args.plan, flags=flags.keys())


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.atomic_io import exclusive
    from nnunet_ext.cluster import slurm
    from nnunet_ext.cluster.local import StepFailed, ordered_steps, run_local
    from nnunet_ext.cluster.workflow import build_workflow

    if args.from_step and not args.local:
        raise UserFacingError("--from only applies to --local runs (with SLURM, submit the scripts you need).")
    workflow = build_workflow(load_spec(args))
    out = Path(args.out or DEFAULT_OUT).absolute()
    files = slurm.generate(workflow, out)  # every check; nothing is written before this returns
    if args.from_step:
        try:
            ordered_steps(workflow, args.from_step)
        except ValueError as error:
            raise UserFacingError(f"--from: {error}") from None
    if args.dry_run:
        for generated in files:
            print(f"==> {out / generated.name} <==\n{generated.text}")
        print(_summary(workflow))
        return 0
    submit_all = shlex.quote(str(out / slurm.SUBMIT_ALL))
    with exclusive(out, "nnunet-ext slurm run"):
        slurm.write(files, out)
        print(_summary(workflow))
        print(f"Scripts written to {out}.")
        if args.local:
            try:
                run_local(workflow, out, from_step=args.from_step)
            except StepFailed as failure:
                print(f"nnunet-ext slurm --local: {failure}", file=sys.stderr)
                return 1
            return 0
    if args.submit:
        return subprocess.run(["bash", str(out / slurm.SUBMIT_ALL)]).returncode
    print(f"Submit with: bash {submit_all}   (without SLURM: the same command with --local)")
    return 0


def _summary(workflow) -> str:
    lines = ["Steps:"]
    for step in workflow.steps:
        array = f", array of {step.array_size}" if step.tasks else ""
        gpus = f", {step.resources.gpus} GPU(s)" if step.resources.gpus else ""
        after = f", after {'+'.join(step.after)}" if step.after else ""
        lines.append(f"  {step.name}: {step.description}{array}{gpus}{after}")
    return "\n".join(lines)
