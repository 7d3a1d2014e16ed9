"""Network classes of nnunet-ext (installed as ``nnunet_ext.architectures``) and their registry.

``NETWORKS`` names every network we provide; ``paper_network(name)`` builds one in its paper's
configuration (input channels, classes, patch size as in METHODS.md). Tests and
``benchmarks/params.py`` are parametrised over it, so a registered network is tested for
shapes, gradients and parameter count without new test code. Builders are imported on demand:
importing this package does not import any network module.
"""
from __future__ import annotations

from nnunet_ext.registry import import_object, paper_networks, unknown_name_message

NETWORKS: tuple[str, ...] = tuple(paper_networks())


def paper_network(name: str):
    """Build network ``name`` in its paper configuration (a ``torch.nn.Module``)."""
    networks = paper_networks()
    if name not in networks:
        raise KeyError(unknown_name_message("network", name, list(networks)))
    return import_object(networks[name].builder)()
