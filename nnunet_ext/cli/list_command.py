"""``nnunet-ext list``: every trainer, network and planner we provide, read from the registry."""
from __future__ import annotations

import argparse

from nnunet_ext.registry import METHODS, class_name


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("list", help="list our trainers, networks and planners with their papers",
                                   description="Lists every trainer (use with nnUNetv2_train -tr), network and "
                                               "planner (use with nnunet-ext plan -pl) that nnunet-ext provides.")
    parser.set_defaults(run=run)


def listing_lines() -> list[str]:
    rows = []
    for method in METHODS:
        for path in method.trainers:
            rows.append(("trainer", class_name(path), method))
        for network in method.networks:
            rows.append(("network", network.name, method))
        for path in method.planners:
            rows.append(("planner", class_name(path), method))
    width = max((len(name) for _, name, _ in rows), default=0)
    return [f"{kind:<8} {name:<{width}}  {method.title}: {method.paper}" for kind, name, method in rows]


def run(args: argparse.Namespace) -> int:
    for line in listing_lines():
        print(line)
    return 0
