"""``nnUNetv2_train ... -pretrained_weights FILE`` for our networks: nnU-Net's transfer, with each head named.

nnU-Net's loader (``nnunetv2/run/load_pretrained_weights.py``) copies every tensor of the file into
the network built from the plans and re-initialises only keys containing ``.seg_layers.``; any
other missing or differently shaped key stops it (an ``AssertionError`` naming the first). Our
networks' output layers have other names (MC-Net+'s ``head``, CoTr's ``cls_conv``, DoDNet's
``controller``, ...), so with nnU-Net's loader a different label count could not be fine-tuned.

:func:`load_pretrained_weights` replaces it for the networks in :data:`HEADS` (installed by
:func:`install`, which ``trainers/base.py`` calls through ``compat.route_pretrained_weights``);
every other network still goes through nnU-Net's own loader, unchanged. For ours:

* every tensor outside the head must be in the file with the network's shape; anything missing,
  unexpected or of another shape is refused in one line that lists the layers (no traceback under
  ``nnUNetv2_train``) before any weight is changed;
* head tensors (:data:`HEADS`) are loaded where the file has them with the same shape, and keep
  the network's fresh initialisation where the shape differs (another label count, another task
  list) or the file lacks them - nnU-Net's re-initialisation, limited to what does not fit;
* a file written by ``nnunet-ext import-weights`` (official weights) is refused when the network
  is not built in the official conventions (``official_weights_problem()``: CoTr and TransDoDNet
  with the corrected axis order would load those weights without any error and compute something
  else; UniSeg, BA-Net and ClassSAM in their default conventions).

The file is read with ``torch.load(weights_only=True)`` and the allow-list of
:mod:`nnunet_ext.official_weights` (numpy scalars, which nnU-Net's own checkpoints hold in their
logs).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from nnunet_ext.errors import UserFacingError

#: Network class name (ours, see ``nnunet_ext.registry``) -> ``fnmatch`` patterns of the state-dict
#: keys that form its head: the layers whose shape depends on the label count and, for the universal
#: networks, on the task list (UniSeg's prompt and FUSE block, DoDNet's controller, TransDoDNet's
#: controller and task queries). tests/test_pretrained_finetune.py checks that they cover exactly
#: what changes with those counts.
HEADS: dict[str, tuple[str, ...]] = {
    "CoTr": ("decoder.cls_conv.*", "decoder.ds_heads.*"),
    "BANet": ("decoder.segmentation.seg_layers.*",),  # the boundary heads always have 2 channels
    "UniSeg": ("decoder.seg_layers.*", "prompt", "fuse.*"),
    "MCNet": ("decoder.decoders.*.head.*",),
    "LeFeD": ("decoder.decoder1.head.*", "decoder.decoder2.head.*", "decoder.side.heads.*"),
    "DoDNet": ("controller.*",),
    "TransDoDNet": ("controller.2.*", "query_decoder.query_embed.*"),
    "ClassSAM": ("prompt_encoder.prototypes.*",),
}
#: what ``nnunet-ext import-weights`` writes beside ``network_weights``
IMPORT_KEY = "nnunet_ext_import"
#: set on the network after a load: the file's path (a trainer can tell that weights came from it)
LOADED_FROM = "nnunet_ext_pretrained_from"


def unwrap(network):
    """The module nnU-Net's loader loads into: without DDP's ``.module`` and torch.compile's ``_orig_mod``."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    module = network.module if isinstance(network, DistributedDataParallel) else network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def head_patterns(network) -> tuple[str, ...] | None:
    """The head patterns of one of our networks (its class or a base class of it), None for any other."""
    for cls in type(network).__mro__:
        if cls.__module__.startswith("nnunet_ext.") and cls.__name__ in HEADS:
            return HEADS[cls.__name__]
    return None


def is_head(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


@dataclass
class Transfer:
    """What a load does: tensors taken from the file, head tensors kept, and what does not fit."""

    loaded: dict = field(default_factory=dict)  # key -> tensor from the file
    reinitialised: list = field(default_factory=list)  # (key, file shape or None, network shape)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    misshaped: list = field(default_factory=list)  # (key, file shape, network shape)

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)


def plan_transfer(own: Mapping, weights: Mapping, patterns) -> Transfer:
    """Compare the network's state dict with the file's, key by key (see the module docstring)."""
    transfer = Transfer()
    for key, tensor in own.items():
        theirs = weights.get(key)
        if theirs is not None and tuple(theirs.shape) == tuple(tensor.shape):
            transfer.loaded[key] = theirs
        elif is_head(key, patterns):
            transfer.reinitialised.append((key, None if theirs is None else tuple(theirs.shape), tuple(tensor.shape)))
        elif theirs is None:
            transfer.missing.append(key)
        else:
            transfer.misshaped.append((key, tuple(theirs.shape), tuple(tensor.shape)))
    transfer.unexpected = [key for key in weights if key not in own and not is_head(key, patterns)]
    return transfer


def _layers(keys) -> list[str]:
    """State-dict keys as layers (``a.b.weight`` and ``a.b.bias`` -> ``a.b``), in order, once each."""
    layers = []
    for key in keys:
        layer = key.rsplit(".", 1)[0] if "." in key else key
        if layer not in layers:
            layers.append(layer)
    return layers


def _listing(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def mismatch_message(path, network, transfer: Transfer, patterns) -> str:
    parts = []
    if transfer.misshaped:
        parts.append("of another shape: " + _listing([f"{key} (file {list(theirs)}, network {list(ours)})"
                                                      for key, theirs, ours in transfer.misshaped], 4))
    if transfer.missing:
        parts.append("missing from the file: " + _listing(_layers(transfer.missing)))
    if transfer.unexpected:
        parts.append("in the file but not in the network: " + _listing(_layers(transfer.unexpected)))
    return (f"the pretrained weights {path} do not fit the {type(network).__name__} these plans build - "
            f"{'; '.join(parts)}. Only the head ({', '.join(patterns)}) may differ (it is re-initialised); "
            f"train with plans that build the checkpoint's network (see docs/how-to/official-weights.md, "
            f"'Plans for fine-tuning').")


def read_weights(path) -> dict:
    """The checkpoint at ``path``, read as ``import-weights`` reads official files (``weights_only=True``
    with the allow-list: :func:`nnunet_ext.official_weights.read_checkpoint`); one-line errors."""
    from nnunet_ext.official_weights import read_checkpoint

    path = Path(path)
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), Mapping):
        raise UserFacingError(f"-pretrained_weights {path} is not an nnU-Net v2 checkpoint (no 'network_weights'); "
                              f"convert an official checkpoint with nnunet-ext import-weights NAME FILE -o OUT.pth")
    return checkpoint


#: per network class: where the official conventions are set, for the refusal's fix
OFFICIAL_SWITCH = {
    "CoTr": "\"axis_order\": \"official\" in the configuration's architecture.arch_kwargs (CoTrPlanner plans)",
    "TransDoDNet": "\"axis_order\": \"official\" in the configuration's architecture.arch_kwargs",
    "UniSeg": "\"conventions\": \"official\" in the configuration's architecture.arch_kwargs",
    "BANet": "\"conventions\": \"official\" in the configuration's architecture.arch_kwargs",
    "ClassSAM": "\"conventions\": \"official\" in the plans' nnunet_ext_class_sam",
}


def refuse_unofficial(path, network, checkpoint: Mapping) -> None:
    """Official weights (written by import-weights) only into a network in the official conventions."""
    imported = checkpoint.get(IMPORT_KEY)
    check = getattr(network, "official_weights_problem", None)
    if not isinstance(imported, Mapping) or check is None:
        return
    problem = check()
    if problem:
        switch = OFFICIAL_SWITCH.get(type(network).__name__, "the official conventions in the plans")
        raise UserFacingError(f"{path} holds official {imported.get('network', '')} weights (nnunet-ext "
                              f"import-weights), but {problem}; they would load and compute something else. Set "
                              f"{switch} (see docs/how-to/official-weights.md)")


def load_pretrained_weights(network, fname, verbose: bool = False, nnunet_loader: Callable | None = None) -> None:
    """``-pretrained_weights``: our transfer for the networks in :data:`HEADS`, nnU-Net's loader otherwise."""
    import torch

    module = unwrap(network)
    patterns = head_patterns(module)
    if patterns is None:
        if nnunet_loader is None:
            raise ValueError(f"{type(module).__name__} has no head entry in nnunet_ext.pretrained.HEADS")
        return nnunet_loader(network, fname, verbose)
    checkpoint = read_weights(fname)
    refuse_unofficial(fname, module, checkpoint)
    own = module.state_dict()
    transfer = plan_transfer(own, checkpoint["network_weights"], patterns)
    if not transfer.fits:
        raise UserFacingError(mismatch_message(fname, module, transfer, patterns))
    with torch.no_grad():
        module.load_state_dict({**own, **transfer.loaded}, strict=True)
    setattr(module, LOADED_FROM, os.fspath(fname))
    print(report(fname, module, transfer, verbose), flush=True)


def report(fname, network, transfer: Transfer, verbose: bool = False) -> str:
    lines = [f"nnunet-ext: pretrained weights {fname}: {len(transfer.loaded)} of "
             f"{len(transfer.loaded) + len(transfer.reinitialised)} tensors of {type(network).__name__} loaded"]
    if transfer.reinitialised:
        lines.append("  re-initialised (head; another shape or not in the file): " + ", ".join(
            f"{key} ({'absent' if theirs is None else list(theirs)} -> {list(ours)})"
            for key, theirs, ours in transfer.reinitialised))
    if verbose:
        lines += [f"  {key} {list(value.shape)}" for key, value in transfer.loaded.items()]
    return "\n".join(lines)


def install() -> None:
    """Route nnU-Net's ``-pretrained_weights`` through :func:`load_pretrained_weights` (idempotent)."""
    from nnunet_ext import compat

    compat.route_pretrained_weights(load_pretrained_weights)
