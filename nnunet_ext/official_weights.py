"""Official checkpoints -> nnU-Net v2 checkpoints of our networks (``nnunet-ext import-weights``).

Each method's official repository saves its weights in its own way (:data:`OFFICIAL_FORMATS`,
read from each repository's training code). :func:`import_weights` reads such a file, finds the
state dict in it, renames the official parameter names to ours with the network's
``from_official_state_dict`` (``paper_network(NAME, conventions="official")``), verifies a strict
load, and writes ``{"network_weights": ...}``, the checkpoint layout nnU-Net v2's
``-pretrained_weights`` loader (``nnunetv2/run/load_pretrained_weights.py``) reads, atomically.
SurgicalSAM (ClassSAM) saves only what it trains; the frozen SAM image encoder comes from the SAM
checkpoint it started from (:func:`class_sam_state`), and the network's configuration (SAM type,
classes, tokens) is read from the two files. :func:`write_model_folder` turns the imported
weights into a trained-model folder (plans, dataset.json, ``fold_0/checkpoint_final.pth``) for
``nnUNetv2_predict`` and ``nnunet-ext predict --task``, after checking that the trainer builds,
from those plans, exactly the network the weights belong to.

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
    "ClassSAM": OfficialFormat("github.com/wenxi-yue/SurgicalSAM",
                               "surgicalSAM/train.py: torch.save({...}, 'model_ckp.pth') at the best validation epoch",
                               "dict of three state dicts: 'prototype_prompt_encoder_state_dict' "
                               "(Prototype_Prompt_Encoder), 'sam_decoder_state_dict' (SAM's MaskDecoder), "
                               "'prototypes_state_dict' (Learnable_Prototypes); the frozen SAM image encoder and "
                               "positional encoding are not saved: they come from the SAM checkpoint it started "
                               "from (--sam-checkpoint, e.g. sam_vit_h_4b8939.pth)"),
}
#: the three state dicts of SurgicalSAM's model_ckp.pth; the SAM checkpoint's parts ClassSAM takes from it
SURGICAL_SAM_PARTS: tuple[str, ...] = ("prototype_prompt_encoder_state_dict", "sam_decoder_state_dict",
                                       "prototypes_state_dict")
SAM_FROZEN_PARTS: tuple[str, ...] = ("image_encoder.", "prompt_encoder.pe_layer.")

#: Keys under which a training script keeps the state dict, in the order they are looked for.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "net", "network", "model_state_dict", "state")
#: Prefixes that wrap every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


def _allowed_globals() -> list:
    """numpy scalars as nnU-Net v1 pickles them (``numpy.core.multiarray.scalar(dtype, bytes)``;
    ``numpy._core`` since numpy 2), ``numpy.dtype`` and the numeric dtype classes their state needs."""
    import importlib

    import numpy as np

    scalar = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else
                                     "numpy.core.multiarray").scalar
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
    network_kwargs: dict = field(default_factory=dict)  # settings read from the files (ClassSAM's)


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


def map_to_ours(name: str, state_dict: dict, path: Path, network=None):
    """(meta network loaded with the weights, our state dict, key map) or a UserFacingError naming
    the wrong method or the missing, unexpected and mis-shaped tensors. ``network``: the official
    network to map onto (default: the paper configuration's)."""
    network = official_network(name) if network is None else network
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


# ------------------------------------------------------------------------------------------ ClassSAM


def _state_dicts_listing(content: Any) -> str:
    return ", ".join(repr(k) for k in list(content)[:8]) if isinstance(content, Mapping) else type(content).__name__


def _other_network(content: Any) -> str | None:
    """The network whose official weights ``content`` holds in one of the usual containers, if any."""
    try:
        state_dict, _ = find_state_dict(content, Path("."))
    except UserFacingError:
        return None
    return network_with_keys(set(strip_wrappers(state_dict)[0]))


def class_sam_state(content: Any, path: Path, sam_checkpoint: str | os.PathLike | None) -> tuple[dict, str, list]:
    """The official ClassSAM state dict (module docstring of ``architectures/class_sam.py``): SurgicalSAM's
    three state dicts, flattened under their names, plus the SAM checkpoint's frozen image encoder and
    positional encoding. Returns (state, container description, removed prefixes)."""
    if not isinstance(content, Mapping) or \
            not all(isinstance(content.get(part), Mapping) for part in SURGICAL_SAM_PARTS):
        other = _other_network(content)
        if other is not None:
            raise UserFacingError(f"{path} holds {other} weights, not SurgicalSAM's: import it as {other}: "
                                  f"nnunet-ext import-weights {other} {path} -o ...")
        raise UserFacingError(f"{path} is not a SurgicalSAM checkpoint: its model_ckp.pth holds the state dicts "
                              f"{', '.join(SURGICAL_SAM_PARTS)}; this file holds {_state_dicts_listing(content)}")
    if sam_checkpoint is None:
        raise UserFacingError(f"ClassSAM needs --sam-checkpoint: SurgicalSAM's {path.name} holds only what it trains "
                              f"(prototypes, prompt encoder, mask decoder); the frozen image encoder comes from the "
                              f"SAM checkpoint it started from (sam_vit_h_4b8939.pth for the released models)")
    state, removed = {}, []
    for part in SURGICAL_SAM_PARTS:
        if not _is_state_dict(content[part]):
            raise UserFacingError(f"{path}: '{part}' is not a state dict (a dict of tensors)")
        weights, stripped = strip_wrappers(dict(content[part]))
        removed += [prefix for prefix in stripped if prefix not in removed]
        state.update({f"{part}.{key}": value for key, value in weights.items()})
    sam_path = Path(sam_checkpoint)
    sam_state, _ = find_state_dict(read_checkpoint(sam_path), sam_path)
    sam_state, _ = strip_wrappers(sam_state)
    frozen = {key: value for key, value in sam_state.items() if key.startswith(SAM_FROZEN_PARTS)}
    if not any(key.startswith("image_encoder.") for key in frozen):
        raise UserFacingError(f"--sam-checkpoint {sam_path} is not a SAM checkpoint: it has no image_encoder.* "
                              f"weights (expected e.g. sam_vit_h_4b8939.pth from github.com/facebookresearch/"
                              f"segment-anything)")
    state.update(frozen)
    container = (f"SurgicalSAM model_ckp.pth ({', '.join(SURGICAL_SAM_PARTS)}) + the image encoder and positional "
                 f"encoding of the SAM checkpoint {sam_path}")
    return state, container, removed


def class_sam_network(state: Mapping, path: Path):
    """ClassSAM (official conventions, meta device) in the configuration the files hold: SAM type from the
    encoder, classes from the prototypes, tokens and hidden widths from the prompt encoder; and its settings."""
    import torch

    from nnunet_ext.architectures.class_sam import SAM_SPECS, ClassSAM, checkpoint_model_type

    try:
        model_type = checkpoint_model_type(state)
    except KeyError as error:
        raise UserFacingError(f"the SAM checkpoint for {path} lacks {error}; is it a whole SAM checkpoint?") from None
    if model_type not in SAM_SPECS:
        raise UserFacingError(f"the SAM checkpoint for {path} holds {model_type}; ClassSAM builds "
                              f"{', '.join(SAM_SPECS)}")

    def rows(key: str, default: int) -> int:  # absent or odd tensors are named by map_to_ours
        value = state.get(key)
        return int(value.shape[0]) if value is not None and value.ndim >= 1 else default

    encoder = "prototype_prompt_encoder_state_dict"
    settings = {"sam_model_type": model_type, "num_tokens": rows(f"{encoder}.sparse_fc_2.weight", 2),
                "hidden_dim_dense": rows(f"{encoder}.dense_fc_1.weight", 128),
                "hidden_dim_sparse": rows(f"{encoder}.sparse_fc_1.weight", 128), "conventions": "official"}
    classes = rows("prototypes_state_dict.class_embeddings.weight", 7) + 1
    with torch.device("meta"):
        network = ClassSAM(input_channels=3, num_classes=classes, **settings)
    return network, {"num_classes": classes, **settings}


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


def convert(name: str, checkpoint: str | os.PathLike,
            sam_checkpoint: str | os.PathLike | None = None) -> tuple[dict, Imported]:
    """Read and map an official checkpoint: (the nnU-Net v2 checkpoint to write, the report without output)."""
    from nnunet_ext import __version__

    _check_name(name)
    source = Path(checkpoint)
    if sam_checkpoint is not None and name != "ClassSAM":
        raise UserFacingError(f"--sam-checkpoint is for ClassSAM only; {name}'s official checkpoint holds every weight")
    content = read_checkpoint(source)
    network, settings = None, {}
    if name == "ClassSAM":
        state_dict, container, removed = class_sam_state(content, source, sam_checkpoint)
        network, settings = class_sam_network(state_dict, source)
    else:
        state_dict, container = find_state_dict(content, source)
        state_dict, removed = strip_wrappers(state_dict)
    network, ours, key_map = map_to_ours(name, state_dict, source, network)
    parameters = sum(p.numel() for p in network.parameters())
    info = {
        "network": name, "conventions": "official", "source": str(source.resolve()),
        "source_sha256": _sha256(source), "container": container, "removed_prefixes": list(removed),
        "tensors": len(set(key_map.values())), "parameters": int(parameters),
        "official_repository": OFFICIAL_FORMATS[name].repository, "nnunet_ext_version": __version__,
    }
    if sam_checkpoint is not None:
        info.update(sam_checkpoint=str(Path(sam_checkpoint).resolve()), num_classes=settings["num_classes"],
                    network_settings={key: value for key, value in settings.items() if key != "num_classes"})
    content = {"network_weights": OrderedDict(ours), "nnunet_ext_import": info}
    return content, Imported(name, source, Path(), container, removed, key_map, int(parameters), _groups(key_map),
                             settings)


def _write_checkpoint(content: dict, output: Path) -> None:
    import torch

    from nnunet_ext.atomic_io import write_with

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_with(output, lambda temporary: torch.save(content, temporary))
    except OSError as error:
        reason = error.strerror or _short(error)
        raise UserFacingError(f"cannot write {output}: {reason}; nothing was written") from None


def import_weights(name: str, checkpoint: str | os.PathLike, output: str | os.PathLike,
                   force: bool = False, sam_checkpoint: str | os.PathLike | None = None) -> Imported:
    """Read an official checkpoint of network ``name``, map it to ours, write ``output`` (atomic).
    ``sam_checkpoint``: ClassSAM only, the SAM checkpoint SurgicalSAM was trained from."""
    source, output = Path(checkpoint), Path(output)
    _check_output(output, source, force)
    content, imported = convert(name, source, sam_checkpoint)
    _check_output(output, source, force)  # again: the read may have taken a while
    _write_checkpoint(content, output)
    imported.output = output
    return imported


# ------------------------------------------------------------------------------------------ model folder


#: what nnUNetTrainer sets as ``inference_allowed_mirroring_axes`` (test-time mirroring), by patch dimension
DEFAULT_MIRRORING = {2: (0, 1), 3: (0, 1, 2)}


def _read_json(path: str | os.PathLike, what: str) -> dict:
    import json

    try:
        content = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserFacingError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserFacingError(f"{what} {path} cannot be read as JSON ({_short(error)})") from None
    if not isinstance(content, dict):
        raise UserFacingError(f"{what} {path} holds a {type(content).__name__}, not a JSON object")
    return content


def trainer_class_named(name: str):
    """A trainer class by name: ours from the registry (cheap), others by nnU-Net's own search."""
    from nnunet_ext import compat
    from nnunet_ext.registry import import_object, trainer_paths

    if name in trainer_paths():
        return import_object(trainer_paths()[name])
    found = compat.find_trainer_class(name)
    if found is None:
        raise UserFacingError(f"unknown trainer {name!r}: neither nnunet-ext's (nnunet-ext list) nor nnU-Net's")
    return found


def plans_as_trainer_saves_them(plans: dict, dataset_json: dict, trainer_class) -> dict:
    """``plans`` with what the trainer's constructor adds before nnU-Net copies them into a model folder:
    a universal trainer's task map (``nnunet_ext_tasks``, from the merged dataset.json), which its
    network is built from at inference."""
    from nnunet_ext.tasks.task_map import TaskMap, TaskMapError
    from nnunet_ext.trainers.universal import TASKS_PLANS_KEY, nnUNetUniversalTrainer

    if not issubclass(trainer_class, nnUNetUniversalTrainer):
        return plans
    try:
        task_map = TaskMap.from_dataset_json(dataset_json)
    except TaskMapError as error:
        raise UserFacingError(f"{trainer_class.__name__} predicts on a merged dataset: --dataset-json {error}") \
            from None
    return {**plans, TASKS_PLANS_KEY: task_map.to_dict()}


def check_fits_trainer_network(content: dict, plans: dict, dataset_json: dict, configuration: str,
                               trainer: str) -> None:
    """Refuse (one line) unless ``trainer`` builds from ``plans``/``dataset_json`` exactly the network the
    weights belong to, in the official conventions: prediction cannot re-initialise a head."""
    from nnunet_ext import compat
    from nnunet_ext.pretrained import mismatch_message, plan_transfer, refuse_unofficial

    trainer_class = trainer_class_named(trainer)
    try:
        network = compat.network_as_trainer_builds_it(trainer_class, plans, dataset_json, configuration, meta=True)
    except UserFacingError:
        raise
    except Exception as error:  # an unknown trainer, a configuration the plans lack, plans the trainer refuses
        raise UserFacingError(f"{trainer} cannot build its network from these plans ({configuration}): "
                              f"{_short(error)}") from None
    refuse_unofficial("the imported checkpoint", network, content)
    transfer = plan_transfer(network.state_dict(), content["network_weights"], ())
    if not transfer.fits:
        text = mismatch_message("(imported)", network, transfer, ())
        raise UserFacingError(text.replace(" Only the head () may differ (it is re-initialised);", " For prediction "
                                           "the head must fit too (the dataset's labels are the checkpoint's);"))


def write_model_folder(content: dict, folder: str | os.PathLike, plans_file: str | os.PathLike,
                       dataset_json_file: str | os.PathLike, configuration: str, trainer: str,
                       force: bool = False) -> Path:
    """A trained-model folder from imported weights: ``plans.json``, ``dataset.json`` and
    ``fold_0/checkpoint_final.pth`` (what nnU-Net's predictor reads: network weights, trainer name,
    configuration, mirroring axes). Checked first (:func:`check_fits_trainer_network`), built in a
    staging folder and moved into place; an existing folder is replaced only with ``force``."""
    import torch

    from nnunet_ext.atomic_io import staged_folder, write_json

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserFacingError(f"--model-folder {folder} is a file; give a folder")
    if folder.exists() and not force:
        raise UserFacingError(f"--model-folder {folder} exists; nothing was written. Pass --force to replace it")
    plans, dataset_json = _read_json(plans_file, "--plans"), _read_json(dataset_json_file, "--dataset-json")
    if configuration not in plans.get("configurations", {}):
        raise UserFacingError(f"--plans {plans_file} has no configuration {configuration!r} (it has "
                              f"{', '.join(plans.get('configurations', {})) or 'none'}); choose one with -c")
    plans = plans_as_trainer_saves_them(plans, dataset_json, trainer_class_named(trainer))
    check_fits_trainer_network(content, plans, dataset_json, configuration, trainer)
    patch = plans["configurations"][configuration].get("patch_size") or []
    checkpoint = {
        "network_weights": content["network_weights"], "trainer_name": trainer,
        "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        "inference_allowed_mirroring_axes": DEFAULT_MIRRORING.get(len(patch)), "current_epoch": 0,
        "nnunet_ext_import": content["nnunet_ext_import"],
    }
    try:
        with staged_folder(folder, replace=force) as staging:
            write_json(staging / "plans.json", plans, sort_keys=False)
            write_json(staging / "dataset.json", dataset_json, sort_keys=False)
            (staging / "fold_0").mkdir()
            torch.save(checkpoint, staging / "fold_0" / "checkpoint_final.pth")
    except OSError as error:
        reason = error.strerror or _short(error)
        raise UserFacingError(f"cannot write {folder}: {reason}; nothing was written") from None
    return folder
