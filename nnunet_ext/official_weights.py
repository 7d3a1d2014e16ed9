"""Official checkpoints -> nnU-Net v2 checkpoints of our networks (``nnunet-ext import-weights``).

Each method's official repository saves its weights in its own way (:data:`OFFICIAL_FORMATS`,
read from each repository's training code). :func:`import_weights` reads such a file, finds the
state dict in it, renames the official parameter names to ours with the network's
``from_official_state_dict`` (``paper_network(NAME, conventions="official")``), verifies a strict
load, and writes ``{"network_weights": ...}``, the checkpoint layout nnU-Net v2's
``-pretrained_weights`` loader (``nnunetv2/run/load_pretrained_weights.py``) reads, atomically.

Checkpoints from the internet are untrusted: they are read with ``torch.load(weights_only=True)``
and an explicit allow-list (:data:`ALLOWED_GLOBALS`) of the only non-tensor types the official
files hold (numpy scalars and their dtypes, in nnU-Net v1's ``.model`` bookkeeping). A pickle that
names anything else is refused with the type's name; nothing in it is run.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from nnunet_ext.errors import UserFacingError


@dataclass(frozen=True)
class OfficialFormat:
    """How the official code of one network saves its weights."""

    repository: str
    saved_by: str  # the official code that writes the file
    layout: str  # what the file holds


_NNUNET_V1 = ("nnU-Net v1 `.model` file: dict with 'state_dict' plus bookkeeping ('epoch', 'optimizer_state_dict', "
              "'lr_scheduler_state_dict', 'plot_stuff' and 'best_stuff' with numpy scalars, 'amp_grad_scaler')")

#: Network name (the registry's) -> the official checkpoint format this module reads.
OFFICIAL_FORMATS: dict[str, OfficialFormat] = {
    "UniSeg": OfficialFormat("github.com/yeerwen/UniSeg",
                             "Upstream/nnunet/training/network_training/network_trainer.py save_checkpoint "
                             "(released: model_final_checkpoint.model)", _NNUNET_V1),
    "BANet": OfficialFormat("github.com/ShishuaiHu/BA-Net (kipa22, amos22)",
                            "nnUNet/nnunet/training/network_training/network_trainer.py save_checkpoint", _NNUNET_V1),
    "CoTr": OfficialFormat("github.com/YtongXie/CoTr",
                           "CoTr_package/CoTr/training/network_training/network_trainer.py save_checkpoint",
                           _NNUNET_V1 + "; keys under 'U_ResTran3D.'"),
    "MCNetPlus": OfficialFormat("github.com/ycwu1997/MC-Net", "code/train_mcnet_3d.py: torch.save(model.state_dict())",
                                "plain state dict of MCNet3d_v2 (*_best_model.pth, iter_*.pth)"),
    "LeFeD": OfficialFormat("github.com/maxwell0027/LeFeD", "train.py: torch.save(model.state_dict())",
                            "plain state dict of LeFeD_Net"),
    "DoDNet": OfficialFormat("github.com/jianpengz/DoDNet", "a_DynConv/train.py",
                             "plain state dict of unet3D, or with --FP16 a dict {'model', 'optimizer', 'amp'}; "
                             "'module.' prefixes when trained on several GPUs"),
    "TransDoDNet": OfficialFormat("github.com/jianpengz/DoDNet", "TransDoD/train.py",
                                  "dict {'state_dict', 'optimizer', 'epoch'(, 'amp')} (checkpoint.pth), keys under "
                                  "'ResCNN_DeformTR.'; 'module.' prefixes when trained on several GPUs"),
}

#: Keys under which a training script keeps the state dict, in the order they are looked for.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "net", "network", "model_state_dict", "state")
#: Prefixes that wrap every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


def _allowed_globals() -> list:
    """numpy scalars as nnU-Net v1 pickles them (``numpy.core.multiarray.scalar(dtype, bytes)``;
    ``numpy._core`` since numpy 2), ``numpy.dtype`` and the numeric dtype classes their state needs."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = {type(np.dtype(code)) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")}
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *sorted(dtypes, key=lambda t: t.__name__)]


def allowed_global_names() -> list[str]:
    return [item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}"
            for item in _allowed_globals()]


# ------------------------------------------------------------------------------------------ reading


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200] + (" ..." if len(text) > 200 else "")


def read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with the allow-list; every failure a one-line
    UserFacingError: a type outside the allow-list (named), or a truncated or corrupt file."""
    import torch

    if not path.exists():
        raise UserFacingError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserFacingError(f"checkpoint {path} is not a file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        named = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"but got <class '([\w.]+)'>", text)
        if named:
            raise UserFacingError(
                f"{path} needs the type {named.group(1)} to be unpickled, which is not on the allow-list of checkpoint "
                f"types ({', '.join(allowed_global_names()[:3])} and numpy dtypes): refused, nothing in it was run. "
                f"If you trust the file, re-save only its state dict (tensors) and import that.") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|Check the documentation|$)", text)
        raise UserFacingError(f"cannot read {path}: truncated or not a PyTorch checkpoint (corrupt pickle: "
                              f"{reason.group(1) if reason else _short(error)})") from None
    except MemoryError:
        raise
    except Exception as error:  # zip/pickle/storage errors of a damaged file all land here
        raise UserFacingError(f"cannot read {path}: truncated or not a PyTorch checkpoint ({_short(error)})") from None


def _is_state_dict(value: Any) -> bool:
    import torch

    return isinstance(value, Mapping) and len(value) > 0 and \
        all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def find_state_dict(content: Any, path: Path) -> tuple[dict, str]:
    """The state dict inside a loaded checkpoint and a description of the container."""
    if not isinstance(content, Mapping):
        raise UserFacingError(f"{path} holds a {type(content).__name__}, not a state dict or a dict holding one")
    if "network_weights" in content:
        raise UserFacingError(f"{path} is already an nnU-Net v2 checkpoint ('network_weights'): give it to "
                              f"nnUNetv2_train -pretrained_weights directly, it needs no import")
    if _is_state_dict(content):
        return dict(content), "plain state dict"
    for key in STATE_DICT_KEYS:
        if _is_state_dict(content.get(key)):
            others = [str(k) for k in content if k != key]
            kind = "nnU-Net v1 .model file" if "plot_stuff" in content or "best_stuff" in content else "dict"
            extra = f" plus {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}" if others else ""
            return dict(content[key]), f"{kind} with the state dict under '{key}'{extra}"
    keys = ", ".join(repr(k) for k in list(content)[:8])
    raise UserFacingError(f"{path} holds no state dict: a dict of tensors, or one under any of "
                          f"{', '.join(STATE_DICT_KEYS)}, was expected; its top-level keys are {keys}")


def strip_wrappers(state_dict: dict) -> tuple[dict, list[str]]:
    """Remove prefixes that wrap every key (DataParallel's ``module.``, torch.compile's ``_orig_mod.``)."""
    removed = []
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                removed.append(prefix)
                changed = True
    return state_dict, removed


# ------------------------------------------------------------------------------------------ mapping


def _check_name(name: str) -> None:
    from nnunet_ext.registry import paper_networks, unknown_name_message

    if name in OFFICIAL_FORMATS:
        return
    if name in paper_networks():
        raise UserFacingError(f"{name} has no official key map yet; networks whose official weights can be imported: "
                              f"{', '.join(sorted(OFFICIAL_FORMATS))}")
    raise UserFacingError(unknown_name_message("network", name, sorted(OFFICIAL_FORMATS)))


def official_network(name: str):
    """``paper_network(name, conventions="official")`` on the meta device (no memory, no init)."""
    import torch

    from nnunet_ext.architectures import paper_network

    with torch.device("meta"):
        return paper_network(name, "official")


@lru_cache(maxsize=None)
def official_keys(name: str) -> frozenset[str]:
    return frozenset(official_network(name).official_key_map().values())


def network_with_keys(keys: set[str]) -> str | None:
    """The network whose official parameter names are exactly ``keys`` (None if none). Exact, not
    closest: MC-Net+ and LeFeD share most names, and a 2-decoder MC-Net file is a subset of both."""
    return next((name for name in OFFICIAL_FORMATS if official_keys(name) == keys), None)


@dataclass
class Imported:
    """What :func:`import_weights` did, for the report."""

    name: str
    source: Path
    output: Path
    container: str
    removed_prefixes: list[str]
    key_map: dict[str, str]  # ours -> official
    parameters: int
    groups: list[tuple[str, str, int]] = field(default_factory=list)  # (official prefix, our prefix, tensors)


def _common_prefix(keys: list[str]) -> str:
    parts = [key.split(".")[:-1] for key in keys]
    common = []
    for components in zip(*parts):
        if len(set(components)) > 1:
            break
        common.append(components[0])
    return ".".join(common)


def _groups(key_map: Mapping[str, str]) -> list[tuple[str, str, int]]:
    """(official module, our module, tensors) for the report: official keys grouped by their first
    name component (after a wrapper root such as ``U_ResTran3D.`` that every official key shares) and
    our first component, each side shown as the longest common prefix of its keys."""
    roots = {key.split(".", 1)[0] for key in key_map.values()}
    depth = 2 if len(roots) == 1 else 1
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for ours, theirs in key_map.items():
        groups.setdefault((".".join(theirs.split(".")[:depth]), ours.split(".", 1)[0]), []).append((ours, theirs))
    return [(_common_prefix([t for _, t in pairs]) or theirs, _common_prefix([o for o, _ in pairs]) or ours,
             len({t for _, t in pairs})) for (theirs, ours), pairs in groups.items()]


def _finite(tensor) -> bool:
    """All values finite, checked on the tensor's storage (what the file holds: the same values as
    the tensor for a saved parameter, one value for an expanded one), not element by element of a view."""
    import torch

    storage = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(tensor.untyped_storage())
    return bool(torch.isfinite(storage).all())


def map_to_ours(name: str, state_dict: dict, path: Path):
    """(meta network loaded with the weights, our state dict, key map) or a UserFacingError naming
    the wrong method or the missing, unexpected and mis-shaped tensors."""
    network = official_network(name)
    key_map = network.official_key_map()
    try:
        ours = network.from_official_state_dict(state_dict)
    except ValueError as error:
        keys = set(state_dict)
        other = network_with_keys(keys)
        if other is not None and other != name:
            raise UserFacingError(
                f"{path} holds {other} weights, not {name}'s: its parameter names are exactly {other}'s official "
                f"ones. Import it as {other}: nnunet-ext import-weights {other} {path} -o ...") from None
        own = len(keys & official_keys(name)) / len(keys | official_keys(name))
        hint = f" (only {own:.0%} of the names agree with {name}'s official ones)" if own < 0.5 else ""
        raise UserFacingError(f"{path} is not an official {name} checkpoint{hint}: "
                              f"{str(error).replace('the state dict does not match the official network: ', '')}"
                              ) from None
    expected = network.state_dict()
    mistyped = sorted(key_map[k] for k, value in ours.items()
                      if value.is_floating_point() != expected[k].is_floating_point())
    broken = sorted({key_map[k] for k, value in ours.items() if value.is_floating_point() and not _finite(value)})
    if mistyped:
        raise UserFacingError(f"{path}: tensors of the wrong kind (integer where floats belong or the reverse): "
                              f"{', '.join(mistyped[:8])}{' ...' if len(mistyped) > 8 else ''}")
    if broken:
        raise UserFacingError(f"{path} is corrupt: NaN or infinite values in {', '.join(broken[:8])}"
                              f"{' ...' if len(broken) > 8 else ''} ({len(broken)} tensors)")
    try:
        network.load_state_dict(ours, strict=True, assign=True)
    except RuntimeError as error:  # from_official checked names and shapes; this is the last guard
        raise UserFacingError(f"{path}: the mapped weights do not load into {name}: {_short(error)}") from None
    return network, ours, key_map


# ------------------------------------------------------------------------------------------ writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_output(output: Path, source: Path, force: bool) -> None:
    if output.exists() or output.is_symlink():
        if output.is_dir():
            raise UserFacingError(f"output {output} is a folder; give a file name such as {output / 'weights.pth'}")
        if output.resolve() == source.resolve():
            raise UserFacingError(f"output {output} is the checkpoint being imported; choose another file name")
        if not force:
            raise UserFacingError(f"output {output} exists; nothing was written. Pass --force to replace it")


def import_weights(name: str, checkpoint: str | os.PathLike, output: str | os.PathLike,
                   force: bool = False) -> Imported:
    """Read an official checkpoint of network ``name``, map it to ours, write ``output`` (atomic)."""
    import torch

    from nnunet_ext import __version__
    from nnunet_ext.atomic_io import write_with

    _check_name(name)
    source, output = Path(checkpoint), Path(output)
    _check_output(output, source, force)
    content = read_checkpoint(source)
    state_dict, container = find_state_dict(content, source)
    state_dict, removed = strip_wrappers(state_dict)
    network, ours, key_map = map_to_ours(name, state_dict, source)
    parameters = sum(p.numel() for p in network.parameters())
    checkpoint_content = {
        "network_weights": OrderedDict(ours),
        "nnunet_ext_import": {
            "network": name, "conventions": "official", "source": str(source.resolve()),
            "source_sha256": _sha256(source), "container": container, "removed_prefixes": list(removed),
            "tensors": len(set(key_map.values())), "parameters": int(parameters),
            "official_repository": OFFICIAL_FORMATS[name].repository, "nnunet_ext_version": __version__,
        },
    }
    _check_output(output, source, force)  # again: the read may have taken a while
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_with(output, lambda temporary: torch.save(checkpoint_content, temporary))
    except OSError as error:
        reason = error.strerror or _short(error)
        raise UserFacingError(f"cannot write {output}: {reason}; nothing was written") from None
    return Imported(name, source, output, container, removed, key_map, int(parameters), _groups(key_map))
