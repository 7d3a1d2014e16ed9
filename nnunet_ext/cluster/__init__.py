"""The whole nnU-Net workflow as batch jobs: SLURM scripts, or the same DAG run locally.

``spec`` reads the job description (JSON plan and/or flags), ``workflow`` builds the DAG of steps
once, ``slurm`` writes it as sbatch scripts chained by dependencies, ``local`` runs those scripts
here in order, and ``predict_best`` is the predict step's helper (nnU-Net's chosen model or
ensemble). ``quoting`` decides how a plan's values reach a script (one quoted bash word, an
``#SBATCH`` value sbatch reads back as written) and refuses what no script can carry. Importing
this package is cheap: no torch, no nnunetv2.
"""
from __future__ import annotations

from nnunet_ext.cluster.spec import EXAMPLE_PLAN, JobSpec, build_spec, read_plan_file
from nnunet_ext.cluster.workflow import Resources, Step, Workflow, build_workflow

__all__ = ["EXAMPLE_PLAN", "JobSpec", "Resources", "Step", "Workflow", "build_spec", "build_workflow",
           "read_plan_file"]
