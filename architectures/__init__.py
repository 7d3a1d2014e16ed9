"""Network classes of nnunet-ext (installed as ``nnunet_ext.architectures``) and their registry.

``NETWORKS`` names every network we provide; ``paper_network(name, conventions)`` builds one in its
paper's configuration (input channels, classes, patch size as in the paper), in our default
conventions or in the official implementation's (``"official"``: the choices that let the
official weights load; the same network where ours already is the official one). Tests and
``benchmarks/params.py`` are parametrised over it: every registered network, in both
conventions, is checked for its exact parameter count (``tests/test_conventions.py``) and, on a
small variant of the same class with the same convention keywords (in each convention that
builds another network)
(``tests/small_networks.py``), for output shapes and a finite gradient reaching every
trainable parameter (``tests/test_registry.py``) and for ``torch.compile`` (``tests/test_compile.py``).
A new network needs its registry entry and one small-variant line. Builders are imported on
demand: importing this package does not import any network module.
"""
from __future__ import annotations

from nnunet_ext.registry import CONVENTIONS, import_object, paper_networks, unknown_name_message

NETWORKS: tuple[str, ...] = tuple(paper_networks())


def paper_network(name: str, conventions: str = "default"):
    """Build network ``name`` in its paper configuration (a ``torch.nn.Module``).

    ``conventions``: ``"default"`` or ``"official"``; the registry entry's ``official_kwargs`` say
    which builder keywords the official convention sets (UniSeg, BA-Net, ClassSAM: ``conventions``; CoTr,
    TransDoDNet: ``axis_order``; none for the networks that equal the official code as they are).
    """
    networks = paper_networks()
    if name not in networks:
        raise KeyError(unknown_name_message("network", name, list(networks)))
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    entry = networks[name]
    kwargs = dict(entry.official_kwargs) if conventions == "official" else {}
    return import_object(entry.builder)(**kwargs)
