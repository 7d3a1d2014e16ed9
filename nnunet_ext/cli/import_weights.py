"""``nnunet-ext import-weights NAME CHECKPOINT -o OUT.pth``: an official checkpoint -> nnU-Net v2 weights.

The reading, mapping and writing are :mod:`nnunet_ext.official_weights`; this module is the
command line and the report.
"""
from __future__ import annotations

import argparse

from nnunet_ext.errors import UserFacingError

_MODEL_FOLDER_OPTIONS = ("plans", "dataset_json", "trainer")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-weights", help="convert an official checkpoint of a method into nnU-Net v2 weights",
        description="Reads CHECKPOINT as the official repository of network NAME saves it (nnU-Net v1 .model files, "
                    "plain state dicts, dicts holding one under 'state_dict'/'model'/'net', 'module.' prefixes of "
                    "DataParallel, SurgicalSAM's model_ckp.pth), untrusted: torch.load(weights_only=True) with an "
                    "allow-list of numpy scalar types, nothing else is unpickled. Renames the official parameters "
                    "to ours for paper_network(NAME, conventions='official'), checks that every tensor is there "
                    "with its shape and loads strictly, then writes OUT as an nnU-Net v2 checkpoint "
                    "('network_weights') for nnUNetv2_train ... -pretrained_weights OUT, and/or, with "
                    "--model-folder, a trained-model folder for nnUNetv2_predict (atomically; existing outputs "
                    "only with --force).")
    parser.add_argument("name", metavar="NAME",
                        help="network, as `nnunet-ext list` names it: UniSeg, BANet, CoTr, MCNetPlus, LeFeD, DoDNet, "
                             "TransDoDNet, ClassSAM")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="the official checkpoint file")
    parser.add_argument("-o", "--output", metavar="OUT.pth",
                        help="the nnU-Net v2 checkpoint to write (for -pretrained_weights); required unless "
                             "--model-folder is given")
    parser.add_argument("--sam-checkpoint", metavar="SAM.pth",
                        help="ClassSAM only: the SAM checkpoint SurgicalSAM was trained from (e.g. "
                             "sam_vit_h_4b8939.pth); its frozen image encoder is not in SurgicalSAM's file")
    parser.add_argument("--model-folder", metavar="DIR",
                        help="also write a trained-model folder (DIR/plans.json, DIR/dataset.json, "
                             "DIR/fold_0/checkpoint_final.pth) for nnUNetv2_predict / nnunet-ext predict; needs "
                             "--plans, --dataset-json and -tr, and is refused unless the trainer builds exactly "
                             "the checkpoint's network from them. For nnUNetv2_predict -d, name it "
                             "$nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION")
    parser.add_argument("--plans", metavar="PLANS.json", help="with --model-folder: the plans to predict with")
    parser.add_argument("--dataset-json", metavar="dataset.json",
                        help="with --model-folder: the dataset.json to predict with (labels, channels, file ending)")
    parser.add_argument("-c", "--configuration", default="3d_fullres",
                        help="with --model-folder: the plans' configuration. Default: 3d_fullres")
    parser.add_argument("-tr", "--trainer", metavar="TRAINER", help="with --model-folder: the trainer, e.g. "
                                                                    "UniSegTrainer")
    parser.add_argument("--force", action="store_true", help="replace OUT and DIR if they exist")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every official -> our parameter name")
    parser.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    if args.output is None and args.model_folder is None:
        raise UserFacingError("import-weights writes -o OUT.pth (weights for -pretrained_weights) and/or "
                              "--model-folder DIR (for prediction): give at least one")
    if args.model_folder is not None:
        missing = [f"--{option.replace('_', '-')}" if option != "trainer" else "-tr"
                   for option in _MODEL_FOLDER_OPTIONS if getattr(args, option) is None]
        if missing:
            raise UserFacingError(f"--model-folder needs {', '.join(missing)} (the plans, dataset.json and trainer "
                                  f"the folder predicts with)")
    else:
        given = [option for option in _MODEL_FOLDER_OPTIONS if getattr(args, option) is not None]
        if given:
            raise UserFacingError(f"--{given[0].replace('_', '-')} is for --model-folder, which was not given")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nnunet_ext import official_weights

    check_arguments(args)
    source = Path(args.checkpoint)
    if args.output is not None:
        official_weights._check_output(Path(args.output), source, args.force)
    content, result = official_weights.convert(args.name, source, args.sam_checkpoint)
    tensors = len(set(result.key_map.values()))
    prefixes = f"; removed the prefix {', '.join(repr(p) for p in result.removed_prefixes)}" \
        if result.removed_prefixes else ""
    print(f"Read {result.source}: {result.container}{prefixes}.")
    print(f"Mapped {tensors} official tensors ({result.parameters:,} parameters) onto {result.name} "
          f"(conventions='official'); every tensor present with its shape, strict load OK:")
    width = max(len(official) for official, _, _ in result.groups)
    for official, ours, count in result.groups:
        print(f"  {official + '.*':<{width + 2}} -> {ours}.*  ({count})")
    if args.verbose:
        for ours, official in result.key_map.items():
            print(f"    {official} -> {ours}")
    if result.network_kwargs:
        settings = {key: value for key, value in result.network_kwargs.items() if key != "num_classes"}
        print(f"Network read from the files: {result.network_kwargs['num_classes']} classes with background; the "
              f"plans' nnunet_ext_class_sam must be {settings}.")
    if args.model_folder is not None:
        folder = official_weights.write_model_folder(content, args.model_folder, args.plans, args.dataset_json,
                                                     args.configuration, args.trainer, force=args.force)
        print(f"Wrote the model folder {folder} ({args.trainer}, {args.configuration}, fold_0/checkpoint_final.pth): "
              f"predict with nnUNetv2_predict_from_modelfolder -m {folder} -f 0 ... (or nnUNetv2_predict -d ... "
              f"-tr {args.trainer} -f 0 when it lies in nnUNet_results)")
    if args.output is not None:
        output = Path(args.output)
        official_weights._check_output(output, source, args.force)  # again: the read may have taken a while
        official_weights._write_checkpoint(content, output)
        print(f"Wrote {output} (nnU-Net v2 checkpoint: network_weights).")
        print(f"Fine-tune with plans whose network is {result.name} with conventions='official' (see "
              f"docs/how-to/official-weights.md): nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS "
              f"-pretrained_weights {output}")
    return 0
