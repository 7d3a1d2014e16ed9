"""Parameter count of every registered network in its paper configuration, against the paper's.

One JSON line per network of ``nnunet_ext.architectures.NETWORKS``: name, parameters counted from
the built module, the paper's (or official code's) count and the relative difference.
"""
from __future__ import annotations

import json

from nnunet_ext.architectures import NETWORKS, paper_network
from nnunet_ext.registry import paper_networks


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    for name in NETWORKS:
        entry = paper_networks()[name]
        counted = count_parameters(paper_network(name))
        paper = entry.paper_parameters
        print(json.dumps({"name": name, "configuration": entry.configuration, "parameters": counted,
                          "paper_parameters": paper,
                          "relative_difference": None if not paper else round((counted - paper) / paper, 5)}))


if __name__ == "__main__":
    main()
