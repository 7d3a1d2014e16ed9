"""``nnunet-ext merge``: several raw nnU-Net datasets -> one multi-task raw dataset with a ``tasks`` section.

The merged dataset is planned, preprocessed and trained with the stock commands; multi-dataset
trainers (UniSeg, DoDNet) read its ``tasks`` section. How labels, channels and case names are
merged is documented in :mod:`nnunet_ext.tasks.merge` and :mod:`nnunet_ext.tasks.label_space`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_ext.setup_checks import require_path_variables


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge raw datasets into one multi-task dataset (for UniSeg, DoDNet, ...)",
        description="Builds nnUNet_raw/DatasetNNN_NAME from the raw datasets given with -d, without modifying "
                    "them: images are hard-linked (or copied with --copy), label maps are remapped into one "
                    "merged label space (the same label name in two datasets becomes one label), datasets with "
                    "fewer channels get zero channels, and dataset.json gets a 'tasks' section (one entry per "
                    "source). Case names become T<task id><task name>_<original case>. Every source image and label is "
                    "decoded and checked first (truncated, NaN, off-grid, wrong dimension, undeclared labels): a bad "
                    "file is named and nothing is written. The output is built in a staging folder and moved into "
                    "place (Ctrl-C leaves nothing; run again to finish); a second merge to the same output waits "
                    "for the first. -np worker processes check and write (same output as one). Then plan and "
                    "preprocess with the stock nnUNetv2_plan_and_preprocess -d NNN.")
    parser.add_argument("-d", type=int, nargs="+", required=True, metavar="ID",
                        help="source dataset ids, in task order")
    parser.add_argument("-o", type=int, required=True, metavar="ID", help="id of the new merged dataset")
    parser.add_argument("--name", default="Merged", help="name of the merged dataset (default: Merged)")
    parser.add_argument("-np", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)), dest="num_processes",
                        help="[OPTIONAL] worker processes that decode, check and write (the output is the same "
                             "for any number). Default: half the CPU cores, at most 8")
    parser.add_argument("--copy", action="store_true",
                        help="copy image files instead of hard-linking them (default: hard links where the "
                             "filesystem allows, else copies)")
    parser.add_argument("--task-names", nargs="+", default=None, metavar="NAME",
                        help="one task name per -d (default: each dataset's name without DatasetXXX_)")
    parser.add_argument("--no-share-labels", action="store_true",
                        help="give every task its own merged labels, named <task>_<label>, even where names agree")
    parser.add_argument("--separate-label", action="append", default=[], metavar="NAME",
                        help="keep this label name per task (<task>_<NAME>) while sharing the others, e.g. a "
                             "'tumour' that means different organs in different datasets; repeatable")
    parser.add_argument("--rename-label", action="append", default=[], metavar="TASK:OLD=NEW",
                        help="use NEW as the merged name of TASK's label OLD, e.g. Liver:Liver=liver to share it "
                             "with other datasets' 'liver'; repeatable")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.tasks.merge import MergeError, MergeOptions, merge_datasets, parse_rename_labels

    require_path_variables(("nnUNet_raw",))
    if args.num_processes < 1:
        raise MergeError(f"-np must be at least 1, got {args.num_processes}.")
    options = MergeOptions(
        task_names=tuple(args.task_names) if args.task_names else None,
        share_labels=not args.no_share_labels, separate_labels=tuple(args.separate_label),
        rename_labels=parse_rename_labels(args.rename_label), copy=args.copy)
    result = merge_datasets(Path(os.environ["nnUNet_raw"]), args.d, args.o, args.name, options, args.num_processes)
    tasks = result.task_map
    names = {value: name for name, value in tasks.labels.items()}
    if result.status == "verified":
        print(f"{result.folder} already holds this merge, complete; nothing written.")
    else:
        verb = "Completed" if result.status == "completed" else "Wrote"
        print(f"{verb} {result.folder}: {result.linked} image(s) hard-linked, {result.copied} copied, "
              f"{result.padded} zero channel(s), {result.labels} label map(s) remapped.")
    print(f"Merged labels: {tasks.labels}; {tasks.max_channels} channel(s).")
    width = max(len(n) for n in tasks.names)
    for task in tasks:
        annotated = ", ".join(names[v] for v in task.annotated_values)
        print(f"  task {task.task_id}  {task.name:<{width}}  from {task.source}: {task.num_channels} channel(s), "
              f"labels {annotated}; cases {task.case_prefix}*")
    print(f"Next: nnUNetv2_plan_and_preprocess -d {args.o} -c 3d_fullres --verify_dataset_integrity")
    return 0
