"""``nnunet-ext plan``: run one of our experiment planners (or one of nnU-Net's) on a dataset.

nnU-Net's ``nnUNetv2_plan_experiment -pl`` only searches nnU-Net's own tree, so our planners are
run here through nnU-Net's Python API. The plans file lands where nnU-Net expects it, and the
stock commands use it with ``-p``/``-plans_name``; the command prints them.
"""
from __future__ import annotations

import argparse
import os

from nnunet_ext import compat
from nnunet_ext.cli.options import process_count
from nnunet_ext.errors import UserFacingError
from nnunet_ext.registry import import_object, planner_paths, unknown_name_message
from nnunet_ext.setup_checks import require_path_variables


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="create plans with one of our planners (then use the stock preprocess/train with -p)",
        description="Extracts the dataset fingerprint if needed and runs the experiment planner PLANNER on the "
                    "dataset. Our planners are listed by 'nnunet-ext list'; nnU-Net's own planners (e.g. "
                    "ExperimentPlanner, nnUNetPlannerResEncM) work as well. The resulting plans are used by "
                    "nnUNetv2_preprocess/nnUNetv2_train/nnUNetv2_predict with -p / -plans_name.")
    parser.add_argument("-d", type=int, nargs="+", required=True, metavar="ID", help="dataset id(s)")
    parser.add_argument("-pl", required=True, metavar="PLANNER", help="planner class name")
    parser.add_argument("-c", nargs="+", default=None, metavar="CONFIG",
                        help="[OPTIONAL] also preprocess these configurations right away (e.g. 3d_fullres). "
                             "Default: plan only and print the preprocessing command")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="[OPTIONAL] GPU memory (GB) the planner may assume. Default: the planner's own")
    parser.add_argument("-overwrite_plans_name", default=None,
                        help="[OPTIONAL] custom plans identifier. Default: the planner's own")
    parser.add_argument("-np", type=process_count, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="[OPTIONAL] processes for fingerprint extraction and preprocessing; 0: none, all in "
                             "this process (for a few small images, where starting workers costs more)")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="[RECOMMENDED] check the raw dataset before extracting its fingerprint")
    parser.set_defaults(run=run)


def resolve_planner(name: str):
    """Our planner of that name, else nnU-Net's; an unknown name lists the close matches."""
    ours = planner_paths()
    if name in ours:
        return import_object(ours[name])
    found = compat.nnunet_planner_class(name)
    if found is not None:
        return found
    raise UserFacingError(unknown_name_message("planner", name, list(ours) + compat.nnunet_planner_names()))


def run(args: argparse.Namespace) -> int:
    require_path_variables(("nnUNet_raw", "nnUNet_preprocessed"))
    planner = resolve_planner(args.pl)
    for dataset_id in args.d:
        try:
            name = compat.dataset_name(dataset_id)
        except RuntimeError as error:
            raise UserFacingError(f"{error}\nExpected a folder Dataset{dataset_id:03d}_<Name> in "
                                  f"{os.environ['nnUNet_raw']}.") from None
        fingerprint = os.path.join(os.environ["nnUNet_preprocessed"], name, "dataset_fingerprint.json")
        if not os.path.isfile(fingerprint):
            print(f"Extracting the fingerprint of {name}...")
            compat.extract_fingerprint(dataset_id, args.np, check_integrity=args.verify_dataset_integrity)
        print(f"Planning {name} with {planner.__name__}...")
        plans = compat.plan_dataset(dataset_id, planner, args.gpu_memory_target, args.overwrite_plans_name)
        print(f"Plans written: {os.path.join(os.environ['nnUNet_preprocessed'], name, plans + '.json')}")
        if args.c:
            compat.preprocess(dataset_id, plans, args.c, args.np)
        else:
            print(f"Next: nnUNetv2_preprocess -d {dataset_id} -plans_name {plans} -c 3d_fullres")
        print(f"Then: nnUNetv2_train {dataset_id} 3d_fullres 0 -p {plans} -tr <Trainer>")
    return 0
