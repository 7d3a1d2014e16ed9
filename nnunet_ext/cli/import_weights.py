"""``nnunet-ext import-weights NAME CHECKPOINT -o OUT.pth``: an official checkpoint -> nnU-Net v2 weights.

The reading, mapping and writing are :mod:`nnunet_ext.official_weights`; this module is the
command line and the report.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-weights", help="convert an official checkpoint of a method into nnU-Net v2 weights",
        description="Reads CHECKPOINT as the official repository of network NAME saves it (nnU-Net v1 .model files, "
                    "plain state dicts, dicts holding one under 'state_dict'/'model'/'net', 'module.' prefixes of "
                    "DataParallel), untrusted: torch.load(weights_only=True) with an allow-list of numpy scalar "
                    "types, nothing else is unpickled. Renames the official parameters to ours for "
                    "paper_network(NAME, conventions='official'), checks that every tensor is there with its "
                    "shape and loads strictly, then writes OUT as an nnU-Net v2 checkpoint ('network_weights') "
                    "for nnUNetv2_train ... -pretrained_weights OUT (atomically; an existing OUT only with --force).")
    parser.add_argument("name", metavar="NAME",
                        help="network, as `nnunet-ext list` names it: UniSeg, BANet, CoTr, MCNetPlus, LeFeD, DoDNet, "
                             "TransDoDNet")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="the official checkpoint file")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.pth", help="the nnU-Net v2 checkpoint to write")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every official -> our parameter name")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.official_weights import import_weights

    result = import_weights(args.name, args.checkpoint, args.output, force=args.force)
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
    print(f"Wrote {result.output} (nnU-Net v2 checkpoint: network_weights).")
    print(f"Fine-tune with plans whose network is {result.name} with conventions='official' (see docs/methods/): "
          f"nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS -pretrained_weights {result.output}")
    return 0
