"""On-disk cache of a frozen image encoder's embeddings of nnU-Net 2d training slices.

Why: ClassSAM's image encoder (SAM ViT-H, ~637 M parameters) is frozen and costs far more than the
trainable rest; SurgicalSAM trains on embeddings computed once, offline. This module is that for
nnU-Net's preprocessed data (used by :class:`nnunet_ext.trainers.class_sam.ClassSAMTrainer`).

The trade-off, stated plainly: nnU-Net augments every training patch differently (rotation,
scaling, intensity, mirroring, ...), and an embedding of an augmented patch is worth nothing the
next time. So with the cache, training sees **fixed, un-augmented tiles**: every slice of every
training case, padded (image 0, labels background, as nnU-Net pads) to at least the patch size and
cut into patch-size tiles on a regular grid (one tile when the slice fits the patch, the usual
case for nnU-Net's 2d plans), optionally also in ``versions`` mirrored copies (2: + left-right,
4: + up-down and both), each encoded from the actually mirrored image - the same idea as
SurgicalSAM's offline augmented copies, with mirroring only. Fast, but less augmentation than
nnU-Net's; validation keeps nnU-Net's loader and the live network.

Layout of a cache for one dataset and configuration, ``<root>/<dataset>/<data_identifier>/``:

* ``encoder.json`` - what every embedding depends on: the encoder's weights (SHA-256 over its
  state dict), the input transform (the caller's ``identity``; ClassSAM's names its conventions too,
  since official and default preprocessing give other embeddings of one patch), patch size,
  versions, stored dtype and shape;
* per case ``<case>.json`` (SHA-256 of the preprocessed image and label arrays, number of items,
  which items hold foreground) written last, after ``<case>.emb.npy`` (embeddings, float16,
  ``(items, D, E, E)``) and ``<case>.seg.npy`` (label tiles, int16, ``(items, H, W)``); every file
  goes through :mod:`nnunet_ext.atomic_io` (temporary name, fsync, rename) and a case's old json is
  removed before its arrays are replaced, so an interrupted build leaves complete entries or misses.

Builders of one folder take turns (a lock beside the folder; the second waits, then is refused),
and temporaries of killed builders are removed when the next build starts. A damaged entry (a
truncated or corrupt json or ``.npy``, an array of the wrong shape or size, a missing array) or a
damaged ``encoder.json`` is refused with a message naming the file, unless rebuilding in place was
asked for, which computes it again.

A case is a *hit* (its json matches the data hash), a *miss* (not there: computed and written) or
*stale* (the preprocessed data changed, or ``encoder.json`` differs because the checkpoint, model
type, transform or tiling changed). Stale is refused with a message saying what changed and how
to go on: delete the folder, point the cache variable elsewhere, or opt in to rebuilding in place,
which replaces only this cache's own files in that folder. The size limit is checked before
anything is computed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from nnunet_ext import atomic_io
from nnunet_ext.errors import UserFacingError

CACHE_FORMAT = 1
EMBEDDING_DTYPE = np.float16
TARGET_DTYPE = np.int16
FLIPS = ((), (-1,), (-2,), (-2, -1))  # versions: none, left-right, up-down, both (on the last two axes)
_SUFFIXES = (".emb.npy", ".seg.npy", ".json")
IDENTITY_FILE = "encoder.json"


class EmbeddingCacheError(UserFacingError):
    """The embedding cache cannot be used as it is (stale, too large, unusable settings)."""


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over shapes, dtypes and bytes of arrays."""
    hasher = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        hasher.update(f"{array.shape}{array.dtype.str}".encode())
        hasher.update(array.view(np.uint8).reshape(-1).data)
    return hasher.hexdigest()


def module_digest(module) -> str:
    """SHA-256 over a torch module's state dict (names, shapes, dtypes, values): its weights' identity."""
    import torch

    hasher = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        values = tensor.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        hasher.update(values.view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def tile_starts(size: int, patch: int) -> list[int]:
    """Start offsets of patch-size tiles covering ``size`` (already padded to >= patch), ends aligned."""
    count = math.ceil(size / patch)
    if count == 1:
        return [0]
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


def slice_tiles(image: np.ndarray, labels: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """One slice ``(C, Y, X)`` + labels ``(Y, X)`` -> tiles ``(T, C, py, px)``, ``(T, py, px)``.

    Padded centrally to at least the patch (image 0, labels 0 = background; nnU-Net's -1 outside the
    nonzero mask also becomes background, as its training transforms do)."""
    labels = np.where(labels < 0, 0, labels)
    pads = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(image.shape[1:], patch)]
    image = np.pad(image, [(0, 0)] + pads)
    labels = np.pad(labels, pads)
    images, targets = [], []
    for y in tile_starts(image.shape[1], patch[0]):
        for x in tile_starts(image.shape[2], patch[1]):
            images.append(image[:, y:y + patch[0], x:x + patch[1]])
            targets.append(labels[y:y + patch[0], x:x + patch[1]])
    return np.stack(images), np.stack(targets)


def case_tiles(data: np.ndarray, seg: np.ndarray, patch: Sequence[int], versions: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Every tile of every slice of a preprocessed case ``data (C, Z, Y, X)``, ``seg (1, Z, Y, X)``, in
    every mirrored version: ``(items, C, py, px)`` float32 and ``(items, py, px)`` int16."""
    images, targets = [], []
    for z in range(data.shape[1]):
        tiles, labels = slice_tiles(np.asarray(data[:, z], dtype=np.float32), np.asarray(seg[0, z]), patch)
        for flip in FLIPS[:versions]:
            images.append(np.flip(tiles, flip) if flip else tiles)
            targets.append(np.flip(labels, flip) if flip else labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(targets).astype(TARGET_DTYPE)


def count_items(data_shape: Sequence[int], patch: Sequence[int], versions: int) -> int:
    """Number of cached items of a case, from its preprocessed shape ``(C, Z, Y, X)``."""
    tiles = [len(tile_starts(max(s, p), p)) for s, p in zip(data_shape[2:], patch)]
    return int(data_shape[1]) * tiles[0] * tiles[1] * versions


@dataclass
class CachePlan:
    """What a build will do: case identifiers by status, and the cache's size afterwards."""

    hits: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # data changed, or damaged (only with rebuild)
    bytes_after: int = 0


class _Damaged(Exception):
    """A cache file that cannot be what it claims to be; the message says what is wrong with which file."""


def _read_json_file(path: Path) -> dict | None:
    """A cache JSON file; None if absent; :class:`_Damaged` if unreadable or not an object."""
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _Damaged(f"{path} is damaged (truncated or corrupt JSON: {str(error).splitlines()[0][:100]})") from None
    if not isinstance(content, dict):
        raise _Damaged(f"{path} is damaged (not a JSON object)")
    return content


def _check_npy(path: Path, dtype, shape: tuple[int, ...]) -> None:
    """Raise :class:`_Damaged` unless ``path`` is a complete ``.npy`` file of this dtype and shape (header
    and file size only: the data is memory-mapped, not read)."""
    if not path.is_file():
        raise _Damaged(f"{path} is missing")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:  # a truncated file cannot be mapped
        raise _Damaged(f"{path} is damaged (truncated or not a .npy file: {str(error).splitlines()[0][:100]})") \
            from None
    if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise _Damaged(f"{path} is damaged (holds {array.dtype} {tuple(array.shape)}, its entry says "
                       f"{np.dtype(dtype)} {tuple(shape)})")
    expected = array.offset + array.nbytes
    del array
    if path.stat().st_size != expected:
        raise _Damaged(f"{path} is damaged ({path.stat().st_size} bytes instead of {expected})")


class EmbeddingCache:
    """The cache folder of one dataset configuration for one encoder identity (module docstring)."""

    def __init__(self, folder: str | os.PathLike, identity: dict, patch_size: Sequence[int],
                 embedding_shape: Sequence[int], versions: int = 1, max_bytes: float = 20 * 1024 ** 3,
                 rebuild: bool = False, stale_advice: str = "point the cache at another folder, or rebuild it in "
                                                            "place (rebuild=True)",
                 size_advice: str = "Raise the limit, use fewer versions, or train without the cache."):
        if versions not in (1, 2, 4):
            raise EmbeddingCacheError(f"embedding cache versions must be 1, 2 or 4 (mirrorings), got {versions}")
        self.folder = Path(folder)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.embedding_shape = tuple(int(s) for s in embedding_shape)
        self.versions, self.max_bytes, self.rebuild = versions, max_bytes, rebuild
        self.stale_advice, self.size_advice = stale_advice, size_advice
        self.identity = {"format": CACHE_FORMAT, "embedding_dtype": np.dtype(EMBEDDING_DTYPE).name,
                         "embedding_shape": list(self.embedding_shape), "patch_size": list(self.patch_size),
                         "versions": versions, **identity}
        self.identity_digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()

    # --- sizes and files --------------------------------------------------------------------------
    @property
    def item_bytes(self) -> int:
        embedding = int(np.prod(self.embedding_shape)) * np.dtype(EMBEDDING_DTYPE).itemsize
        return embedding + int(np.prod(self.patch_size)) * np.dtype(TARGET_DTYPE).itemsize

    def _path(self, identifier: str, suffix: str) -> Path:
        return self.folder / f"{identifier}{suffix}"

    def _own_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir() if p.is_file() and (  # ".tmp-": earlier versions' temporaries
            p.name == IDENTITY_FILE or p.name.endswith(_SUFFIXES) or atomic_io.is_temporary(p) or ".tmp-" in p.name)]

    def entry(self, identifier: str) -> dict | None:
        """A case's entry (``<case>.json``); None if there is none; a damaged one is refused."""
        try:
            return self._verified_entry(identifier)
        except _Damaged as damage:
            raise self._damaged_error(identifier, str(damage)) from None

    def _verified_entry(self, identifier: str) -> dict | None:
        """The entry, after checking it and the header and size of both of its arrays; :class:`_Damaged`
        names the first bad file."""
        path = self._path(identifier, ".json")
        entry = _read_json_file(path)
        if entry is None:
            return None
        try:
            items, foreground = int(entry["items"]), list(entry["foreground"])
            digest, identity = str(entry["digest"]), str(entry["identity"])
        except (KeyError, TypeError, ValueError):
            raise _Damaged(f"{path} is damaged (not an embedding cache entry)") from None
        if identity == self.identity_digest:  # arrays of another identity are not ours to judge
            _check_npy(self._path(identifier, ".emb.npy"), EMBEDDING_DTYPE, (items, *self.embedding_shape))
            _check_npy(self._path(identifier, ".seg.npy"), TARGET_DTYPE, (items, *self.patch_size))
        return {**entry, "items": items, "foreground": foreground, "digest": digest, "identity": identity}

    def _damaged_error(self, identifier: str, damage: str) -> EmbeddingCacheError:
        return EmbeddingCacheError(f"The embedding cache at {self.folder} cannot be used: {damage}. Delete "
                                   f"{self._path(identifier, '.json')} (that case is then computed again), "
                                   f"{self.stale_advice}.")

    # --- deciding ---------------------------------------------------------------------------------
    def _stored_identity(self) -> dict | None:
        try:
            return _read_json_file(self.folder / IDENTITY_FILE)
        except _Damaged as damage:
            if self.rebuild:
                return {"damaged": str(damage)}
            raise EmbeddingCacheError(f"The embedding cache at {self.folder} cannot be used: {damage}; it records "
                                      f"which encoder the embeddings come from. Delete that folder, "
                                      f"{self.stale_advice}.") from None

    def check_identity(self) -> None:
        """Refuse (or, with ``rebuild``, clear) a cache built for another encoder or tiling, or whose
        ``encoder.json`` is damaged."""
        stored = self._stored_identity()
        if stored is None or stored == self.identity:
            return
        changed = sorted(k for k in set(stored) | set(self.identity) if stored.get(k) != self.identity.get(k))
        if not self.rebuild:
            raise EmbeddingCacheError(
                f"The embedding cache at {self.folder} is stale: it was built for another encoder or input "
                f"({', '.join(f'{k}: {stored.get(k)!r} -> {self.identity.get(k)!r}' for k in changed)}). Its "
                f"embeddings do not belong to this training. Delete that folder, {self.stale_advice}.")
        for path in self._own_files():
            path.unlink()

    def plan(self, cases: Mapping[str, tuple[str, Sequence[int]]]) -> CachePlan:
        """Status of every case (``identifier -> (data digest, data shape)``) and the size check.

        Raises for stale or damaged cases (unless ``rebuild``) and when the cache would exceed ``max_bytes``."""
        self.check_identity()
        result = CachePlan()
        new_bytes = 0
        for identifier, (digest, shape) in cases.items():
            try:
                entry = self._verified_entry(identifier)
            except _Damaged as damage:
                if not self.rebuild:
                    raise self._damaged_error(identifier, str(damage)) from None
                entry = {"damaged": True}
            if entry is not None and (entry.get("digest"), entry.get("identity")) == (digest, self.identity_digest):
                result.hits.append(identifier)
                continue
            (result.stale if entry is not None else result.misses).append(identifier)
            new_bytes += count_items(shape, self.patch_size, self.versions) * self.item_bytes
        if result.stale and not self.rebuild:
            raise EmbeddingCacheError(
                f"The embedding cache at {self.folder} is stale: the preprocessed data of {len(result.stale)} "
                f"case(s) changed since their embeddings were computed ({', '.join(result.stale[:5])}"
                f"{', ...' if len(result.stale) > 5 else ''}; was the dataset preprocessed again?). Delete that "
                f"folder, {self.stale_advice}.")
        replaced = {self._path(i, s) for i in result.stale + result.misses for s in _SUFFIXES}
        kept = sum(p.stat().st_size for p in self._own_files() if p not in replaced)
        result.bytes_after = kept + new_bytes
        if result.bytes_after > self.max_bytes:
            raise EmbeddingCacheError(
                f"The embedding cache at {self.folder} would need {result.bytes_after / 1024 ** 3:.2f} GB "
                f"({new_bytes / 1024 ** 3:.2f} GB new for {len(result.misses) + len(result.stale)} case(s), "
                f"{self.item_bytes / 1024 ** 2:.2f} MB per slice tile and version), more than its limit of "
                f"{self.max_bytes / 1024 ** 3:.2f} GB. {self.size_advice}")
        return result

    # --- writing and reading ----------------------------------------------------------------------
    def write_case(self, identifier: str, digest: str, images: np.ndarray, targets: np.ndarray,
                   encode: Callable[[np.ndarray], np.ndarray], batch_size: int) -> None:
        """Encode ``images`` in batches straight into the case's files; its json is written last.

        Every file goes through :mod:`nnunet_ext.atomic_io`; an old entry is removed first, so an
        interruption leaves the case absent (a miss) rather than pointing at half-replaced arrays."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / IDENTITY_FILE).is_file():
            atomic_io.write_json(self.folder / IDENTITY_FILE, self.identity, indent=1, sort_keys=True)
        self._path(identifier, ".json").unlink(missing_ok=True)
        with atomic_io.atomic_path(self._path(identifier, ".emb.npy")) as temporary:
            stored = np.lib.format.open_memmap(temporary, mode="w+", dtype=EMBEDDING_DTYPE,
                                               shape=(len(images), *self.embedding_shape))
            for start in range(0, len(images), batch_size):
                stored[start:start + batch_size] = encode(images[start:start + batch_size])
            stored.flush()
            del stored
        atomic_io.write_with(self._path(identifier, ".seg.npy"),
                             lambda temporary: np.save(temporary, targets.astype(TARGET_DTYPE)))
        foreground = np.flatnonzero((targets > 0).reshape(len(targets), -1).any(1)).tolist()
        atomic_io.write_json(self._path(identifier, ".json"),
                             {"digest": digest, "identity": self.identity_digest, "items": len(images),
                              "foreground": foreground}, indent=1, sort_keys=True)

    def read_case(self, identifier: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Memory-mapped embeddings ``(items, D, E, E)``, label tiles ``(items, H, W)``, foreground items."""
        entry = self.entry(identifier)
        if entry is None:
            raise EmbeddingCacheError(f"{identifier} is not in the embedding cache at {self.folder}: "
                                      f"{self._path(identifier, '.json')} is missing. Build the cache for these "
                                      f"cases first.")
        if entry["identity"] != self.identity_digest:
            raise self._damaged_error(identifier, f"{self._path(identifier, '.json')} belongs to another encoder")
        embeddings = np.load(self._path(identifier, ".emb.npy"), mmap_mode="r")
        targets = np.load(self._path(identifier, ".seg.npy"), mmap_mode="r")
        return embeddings, targets, list(entry["foreground"])


#: how long a second builder of one cache folder waits for the first before it is refused
LOCK_TIMEOUT_S = 3600.0


def build(cache: EmbeddingCache, load_case: Callable[[str], tuple[np.ndarray, np.ndarray]],
          identifiers: Iterable[str], encode: Callable[[np.ndarray], np.ndarray], batch_size: int,
          log: Callable[[str], None] = print) -> CachePlan:
    """Bring the cache up to date for ``identifiers``: hash each case's data, plan, encode the misses.

    ``load_case(identifier) -> (data (C, Z, Y, X), seg (1, Z, Y, X))``; ``encode(tiles (N, C, py, px))
    -> (N, D, E, E)``. Builders of one folder take turns (a lock beside it); temporaries of killed
    builders are removed first."""
    cases = {}
    for identifier in identifiers:
        data, seg = load_case(identifier)
        cases[identifier] = (array_digest(data, seg), tuple(data.shape))
    with atomic_io.exclusive(cache.folder, "embedding cache build", timeout=LOCK_TIMEOUT_S):
        atomic_io.remove_stale_temporaries(cache.folder)
        plan = cache.plan(cases)
        todo = plan.misses + plan.stale
        log(f"embedding cache {cache.folder}: {len(plan.hits)} case(s) cached, {len(plan.misses)} to compute, "
            f"{len(plan.stale)} stale to recompute; {plan.bytes_after / 1024 ** 3:.3f} GB afterwards")
        for number, identifier in enumerate(todo, 1):
            data, seg = load_case(identifier)
            images, targets = case_tiles(data, seg, cache.patch_size, cache.versions)
            cache.write_case(identifier, cases[identifier][0], images, targets, encode, batch_size)
            log(f"embedding cache: {identifier} ({len(images)} tiles) done, {number}/{len(todo)}")
    return plan


class CachedBatches:
    """Endless random training batches from the cache: ``{"embeddings", "target", "keys"}``.

    Items are drawn uniformly, except that the last ``round(B * p)`` samples of each batch come from
    items holding foreground (nnU-Net's rule for ``oversample_foreground_percent`` = p)."""

    def __init__(self, cache: EmbeddingCache, identifiers: Sequence[str], batch_size: int,
                 oversample_foreground_percent: float = 0.33, seed: int | None = None):
        import torch

        self._torch = torch
        self.batch_size, self.oversample = batch_size, oversample_foreground_percent
        self.cases = {identifier: cache.read_case(identifier) for identifier in identifiers}
        self.items = [(i, n) for i, (emb, _, _) in self.cases.items() for n in range(emb.shape[0])]
        self.foreground = [(i, n) for i, (_, _, fg) in self.cases.items() for n in fg] or self.items
        if not self.items:
            raise EmbeddingCacheError(f"the embedding cache at {cache.folder} holds no training items")
        self.random = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        random_count = round(self.batch_size * (1 - self.oversample))
        keys = []
        for sample in range(self.batch_size):
            pool = self.items if sample < random_count else self.foreground
            keys.append(pool[self.random.integers(len(pool))])
        embeddings = np.stack([self.cases[i][0][n] for i, n in keys]).astype(np.float32)
        targets = np.stack([self.cases[i][1][n] for i, n in keys])[:, None]
        return {"embeddings": self._torch.from_numpy(embeddings), "target": self._torch.from_numpy(targets),
                "keys": keys}
