"""Deterministic synthetic abdominal-CT-like 3D volumes written in nnU-Net v2 raw format.

Why this exists: demos, tests and benchmarks of nnU-Net extensions need a dataset that
(a) is created in a second without downloads or licences, (b) looks enough like a real
abdominal CT (HU intensities, anisotropic spacing, organs with distinct intensity *and*
texture, a lesion inside an organ, noise, bias field) that nnU-Net's fingerprinting,
CT normalisation and planning behave as on real data, and (c) is byte-for-byte
reproducible so results can be compared across machines and runs.

Design: anatomy synthesis (:func:`make_case`, :func:`_synthesize_structures`) is kept
separate from writing (:func:`write_synthetic_dataset`).  Structures are returned as
per-structure boolean masks and only turned into a label map by :func:`_export_labels`,
so later variants (partially labelled multi-dataset mode, unlabelled ``imagesUnlabeled``
mode) can reuse the same anatomy and only change *which* labels get exported.

All geometry is defined in millimetres (in units of the smallest physical field-of-view
extent), never in voxels, so a different ``shape``/``spacing`` samples the same anatomy.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from nnunet_ext import raw_dataset
from nnunet_ext.parallel import progress

__all__ = [
    "ORGANS",
    "LESION",
    "SyntheticSpec",
    "make_case",
    "write_synthetic_dataset",
    "dataset_folder_name",
    "case_identifier",
    "channel_phase",
]

#: Labelled organs this generator can draw, in canonical (label id) order.
ORGANS: tuple[str, ...] = ("liver", "kidney", "spleen")
#: Name of the lesion label; the lesion always lies inside the liver.
LESION = "lesion"
#: Key under which the generating spec is stored in dataset.json (enables idempotent re-writes).
METADATA_KEY = "nnunet_ext_synthetic"
#: Bump whenever the generated data changes for the same spec, so stale folders are detected.
GENERATOR_VERSION = 1
FILE_ENDING = ".nii.gz"
#: every synthetic dataset has test cases with labels (labelsTs), for the demo's evaluation
SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
CASE_PREFIX = "synth"
MIN_SHAPE = 16

_AIR_HU = -1000.0
_HU_RANGE = (-1024.0, 3071.0)  # the range a 12-bit CT scanner stores
_NOISE_HU = 10.0  # quantum noise std, typical of a low-dose abdominal CT
_BIAS_AMPLITUDE = 0.02  # max relative attenuation gain per polynomial term
_PSF_SIGMA_MM = 0.6  # in-plane blur so edges have partial-volume voxels like a real scan

# --------------------------------------------------------------------------------------
# Specification
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset; equal specs give identical bytes.

    The spec is stored in ``dataset.json`` so a re-run with the same spec is a no-op
    and a re-run with a different spec refuses to touch the existing folder.
    """

    num_training: int = 10
    num_test: int = 2
    shape: tuple[int, int, int] = (24, 64, 64)  # (z, y, x) voxels
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)  # (z, y, x) mm, anisotropic like CT
    num_channels: int = 1
    seed: int = 0
    organs: tuple[str, ...] = ORGANS  # organs to draw (and label)
    with_lesion: bool = True  # a hypodense lesion ("tumour") inside the liver

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so the frozen spec stays hashable and compares
        # equal to its JSON round trip; then fail early with actionable messages.
        object.__setattr__(self, "shape", _as_int_tuple(self.shape, "shape"))
        object.__setattr__(self, "spacing", _as_float_tuple(self.spacing, "spacing"))
        object.__setattr__(self, "organs", _as_str_tuple(self.organs, "organs"))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending parameter and how to fix it."""
        _require_int(self.num_training, "num_training", minimum=1)
        _require_int(self.num_test, "num_test", minimum=0)
        _require_int(self.num_channels, "num_channels", minimum=1)
        _require_int(self.seed, "seed", minimum=0)
        if any(s < MIN_SHAPE for s in self.shape):
            raise ValueError(
                f"shape={self.shape} is too small: every dimension must be >= {MIN_SHAPE} voxels "
                f"so organs and the lesion stay several voxels thick. Use e.g. shape=(24, 64, 64)."
            )
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(
                f"spacing={self.spacing} must be three positive finite (z, y, x) values in mm, "
                f"e.g. spacing=(3.0, 1.0, 1.0)."
            )
        unknown = [o for o in self.organs if o not in ORGANS]
        if unknown:
            raise ValueError(
                f"organs contains unknown organ(s) {unknown}; valid organs are {list(ORGANS)}."
            )
        if not self.organs:
            raise ValueError(f"organs is empty; nnU-Net needs at least one foreground label. "
                             f"Pick some of {list(ORGANS)}.")
        if len(set(self.organs)) != len(self.organs):
            raise ValueError(f"organs={self.organs} lists an organ twice; list each organ once.")
        if not isinstance(self.with_lesion, bool):
            raise ValueError(f"with_lesion must be a bool, got {self.with_lesion!r}.")
        if self.with_lesion and "liver" not in self.organs:
            raise ValueError("with_lesion=True needs 'liver' in organs because the lesion lies "
                             "inside the liver; add 'liver' to organs or set with_lesion=False.")

    @property
    def label_names(self) -> tuple[str, ...]:
        """Foreground label names in label-id order (id = position + 1)."""
        return self.organs + ((LESION,) if self.with_lesion else ())

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (tuples become lists) used for the dataset.json metadata."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _as_int_tuple(value: Any, name: str) -> tuple[int, int, int]:
    try:
        out = tuple(operator.index(v) for v in value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be three integers (z, y, x), e.g. (24, 64, 64).") from None
    if len(out) != 3:
        raise ValueError(f"{name}={value!r} must have exactly three entries (z, y, x).")
    return out  # type: ignore[return-value]


def _as_float_tuple(value: Any, name: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be three numbers (z, y, x) in mm, e.g. (3.0, 1.0, 1.0).") from None
    if len(out) != 3:
        raise ValueError(f"{name}={value!r} must have exactly three entries (z, y, x).")
    return out  # type: ignore[return-value]


def _as_str_tuple(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r} must be a sequence of names, e.g. ({value!r},).")
    return tuple(str(v) for v in value)


def _require_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


# --------------------------------------------------------------------------------------
# Sampling grid and randomness
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates in anatomy units (mm / ``unit_mm``), centred on the volume.

    Anatomy is expressed in multiples of ``unit_mm`` (the smallest physical extent of the
    field of view) so it always fits the volume, while voxel spacing only enters here.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    unit_mm: float
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # 1D (z, y, x) coordinates

    @classmethod
    def from_spec(cls, spec: SyntheticSpec) -> "_Grid":
        extents = [n * s for n, s in zip(spec.shape, spec.spacing)]
        unit = float(min(extents))
        axes = tuple(((np.arange(n) - (n - 1) / 2.0) * s / unit) for n, s in zip(spec.shape, spec.spacing))
        return cls(spec.shape, spec.spacing, unit, axes)  # type: ignore[arg-type]

    def sigma_voxels(self, sigma_mm: float) -> tuple[float, float, float]:
        """Convert a physical smoothing length to per-axis voxel sigmas (anisotropy-aware)."""
        return tuple(sigma_mm / s for s in self.spacing)  # type: ignore[return-value]

    def index_range(self, axis: int, lo: float, hi: float) -> slice:
        """Voxel slice covering anatomy-unit coordinates [lo, hi] on ``axis`` (clipped)."""
        a = self.axes[axis]
        start = int(np.searchsorted(a, lo, side="left"))
        stop = int(np.searchsorted(a, hi, side="right"))
        return slice(max(start, 0), min(stop, len(a)))


# Independent random streams: drawing (or not drawing) one structure, or adding channels,
# never changes the random numbers used by another structure.
_STREAM_BODY = 0
_STREAM_ORGAN_BASE = 10  # + index in ORGANS
_STREAM_LESION = 30
_STREAM_TEXTURE_BASE = 40  # + tissue index
_STREAM_CHANNEL_BASE = 100  # + channel index


def _rng(spec: SyntheticSpec, case_index: int, stream: int) -> np.random.Generator:
    """Generator seeded from (seed, case_index, stream) so every case/stream is reproducible."""
    return np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(case_index, stream)))


# --------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """Nominal ellipsoid in anatomy units: (z, y, x) centre/semi-axes, in-plane angle (rad)."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle: float


# Axial layout (y: anterior -> posterior, x: image left -> right).  The liver is large on
# one side, the spleen smaller and posterior on the other, two kidneys (one label) sit low
# and posterior beside the spine.  Nominal shapes do not overlap; overlaps introduced by
# per-case jitter are carved away in _synthesize_structures.
_ORGAN_BLOBS: dict[str, tuple[_Blob, ...]] = {
    "liver": (_Blob((0.06, -0.02, -0.17), (0.28, 0.21, 0.25), 0.35),),
    "kidney": (
        _Blob((-0.25, 0.17, -0.21), (0.16, 0.09, 0.08), -0.4),
        _Blob((-0.23, 0.17, 0.21), (0.16, 0.09, 0.08), 0.4),
    ),
    "spleen": (_Blob((0.14, 0.10, 0.26), (0.20, 0.14, 0.11), -0.5),),
}
_BODY_SEMI_AXES = (0.36, 0.46)  # (y, x) of the elliptic-cylinder body
_ORGAN_REGION = 0.84  # organs stay inside this fraction of the body (muscle wall + fat outside)
_FAT_RIM = 0.90  # outer body fraction drawn as subcutaneous fat
_SPINE = ((0.21, 0.0), 0.075)  # (y, x) centre, radius
_AORTA = ((0.08, 0.07), 0.045)


def _jitter_blob(blob: _Blob, rng: np.random.Generator) -> tuple[_Blob, np.ndarray, np.ndarray, np.ndarray]:
    """Per-case random position/size/angle plus smooth deformation parameters.

    Always draws the same number of values so streams stay aligned.
    """
    centre = tuple(np.asarray(blob.centre) + rng.uniform(-0.025, 0.025, 3))
    semi = tuple(np.asarray(blob.semi_axes) * rng.uniform(0.9, 1.1, 3))
    angle = blob.angle + rng.uniform(-0.2, 0.2)
    freqs = rng.normal(size=(3, 3))
    freqs *= rng.uniform(1.5, 3.0, (3, 1)) / np.linalg.norm(freqs, axis=1, keepdims=True)
    phases = rng.uniform(0, 2 * np.pi, 3)
    amps = rng.uniform(0.025, 0.045, 3)  # summed deformation <= ~13% of the radius
    return _Blob(centre, semi, angle), freqs, phases, amps  # type: ignore[arg-type]


def _blob_mask(grid: _Grid, blob: _Blob, freqs: np.ndarray, phases: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """Smoothly deformed, rotated ellipsoid; evaluated only inside its bounding box (speed)."""
    mask: np.ndarray = np.zeros(grid.shape, dtype=bool)
    reach = max(blob.semi_axes) * (1.0 + amps.sum())
    box = tuple(grid.index_range(d, blob.centre[d] - reach, blob.centre[d] + reach) for d in range(3))
    if any(s.stop <= s.start for s in box):
        return mask
    z = grid.axes[0][box[0]][:, None, None] - blob.centre[0]
    y = grid.axes[1][box[1]][None, :, None] - blob.centre[1]
    x = grid.axes[2][box[2]][None, None, :] - blob.centre[2]
    c, s = np.cos(blob.angle), np.sin(blob.angle)
    u = (z / blob.semi_axes[0], (c * y + s * x) / blob.semi_axes[1], (-s * y + c * x) / blob.semi_axes[2])
    radius = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    deform = sum(a * np.sin(f[0] * u[0] + f[1] * u[1] + f[2] * u[2] + p) for f, p, a in zip(freqs, phases, amps))
    mask[box] = radius < 1.0 + deform
    return mask


def _body_radius(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Normalised elliptic-cylinder radius of the body (<1 inside), slightly wobbly and tapered."""
    semi_y, semi_x = np.asarray(_BODY_SEMI_AXES) * rng.uniform(0.95, 1.05, 2)
    taper = rng.uniform(-0.05, 0.05)
    wobble_amp, wobble_phase = rng.uniform(0.0, 0.03), rng.uniform(0, 2 * np.pi)
    z = grid.axes[0][:, None, None]
    y = grid.axes[1][None, :, None]
    x = grid.axes[2][None, None, :]
    theta = np.arctan2(y / semi_y, x / semi_x)
    radius2d = np.sqrt((y / semi_y) ** 2 + (x / semi_x) ** 2) * (1.0 + wobble_amp * np.sin(2 * theta + wobble_phase))
    return radius2d / (1.0 + taper * z)


def _disc(grid: _Grid, centre_yx: tuple[float, float], radius: float) -> np.ndarray:
    """Normalised radius (<1 inside) of an axial disc extruded along z, as a 2D (Y, X) array."""
    y = grid.axes[1][:, None] - centre_yx[0]
    x = grid.axes[2][None, :] - centre_yx[1]
    return np.sqrt(y**2 + x**2) / radius


def _carve(mask: np.ndarray, occupied: np.ndarray) -> np.ndarray:
    """Remove ``occupied`` plus a one-voxel gap from ``mask`` so structures never touch."""
    return mask & ~ndimage.binary_dilation(occupied)


def _place_lesion(grid: _Grid, liver: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lesion ellipsoid centred deep enough inside the liver to be surrounded by liver.

    The centre is the admissible voxel nearest to a random physical target point, so the
    lesion lands in the same place whatever the voxel grid.
    """
    radius_mm = rng.uniform(0.09, 0.12) * grid.unit_mm
    semi_scale = rng.uniform(0.8, 1.0, 3)
    angle = rng.uniform(0, np.pi)
    _, freqs, phases, amps = _jitter_blob(_Blob((0, 0, 0), (1, 1, 1), 0.0), rng)
    target_offset = rng.uniform(-0.15, 0.15, 3)  # anatomy units, relative to the liver centroid
    if not liver.any():
        return np.zeros(grid.shape, dtype=bool)
    depth_mm = ndimage.distance_transform_edt(liver, sampling=grid.spacing)
    margin_mm = 0.5 * max(grid.spacing)
    needed = radius_mm * (1.0 + amps.sum()) + margin_mm
    candidates = np.nonzero(depth_mm >= needed)
    if candidates[0].size == 0:  # tiny volumes: shrink the lesion to fit the deepest point
        deepest = np.unravel_index(int(np.argmax(depth_mm)), grid.shape)
        candidates = tuple(np.array([i]) for i in deepest)
        radius_mm = max(depth_mm[deepest] - margin_mm, 0.5 * min(grid.spacing)) / (1.0 + amps.sum())
    liver_idx = np.nonzero(liver)
    target = [grid.axes[d][liver_idx[d]].mean() + target_offset[d] for d in range(3)]
    distance2 = sum((grid.axes[d][candidates[d]] - target[d]) ** 2 for d in range(3))
    best = int(np.argmin(distance2))
    centre_idx = tuple(int(candidates[d][best]) for d in range(3))
    centre = tuple(float(grid.axes[d][centre_idx[d]]) for d in range(3))
    semi = tuple(radius_mm / grid.unit_mm * semi_scale)
    lesion = _blob_mask(grid, _Blob(centre, semi, angle), freqs, phases, amps)  # type: ignore[arg-type]
    lesion[centre_idx] = True  # the centre voxel is always lesion, so it never vanishes
    return lesion & liver


def _synthesize_structures(spec: SyntheticSpec, case_index: int) -> dict[str, np.ndarray]:
    """All structures of one case as boolean masks (Z, Y, X).

    Labelled structures (``spec.label_names``) are mutually disjoint and inside the body;
    unlabelled context structures (``body``, ``fat``, ``spine``, ``spine_cortex``,
    ``aorta``) may overlap each other and are only used for rendering.
    """
    grid = _Grid.from_spec(spec)
    body_r = _body_radius(grid, _rng(spec, case_index, _STREAM_BODY))
    body = body_r < 1.0
    spine_r = np.broadcast_to(_disc(grid, *_SPINE), grid.shape)
    aorta_r = np.broadcast_to(_disc(grid, *_AORTA), grid.shape)
    structures: dict[str, np.ndarray] = {
        "body": body,
        "fat": body & (body_r >= _FAT_RIM),
        "spine": spine_r < 1.0,
        "spine_cortex": (spine_r < 1.0) & (spine_r >= 0.75),
        "aorta": aorta_r < 1.0,
    }
    occupied = structures["spine"] | structures["aorta"] | (body_r >= _ORGAN_REGION)
    for organ_index, organ in enumerate(ORGANS):  # canonical order -> stable carving priority
        if organ not in spec.organs:
            continue
        rng = _rng(spec, case_index, _STREAM_ORGAN_BASE + organ_index)
        mask: np.ndarray = np.zeros(grid.shape, dtype=bool)
        for blob in _ORGAN_BLOBS[organ]:
            mask |= _blob_mask(grid, *_jitter_blob(blob, rng))
        mask = _carve(mask, occupied)
        occupied |= mask
        structures[organ] = mask
    if spec.with_lesion:
        lesion = _place_lesion(grid, structures["liver"], _rng(spec, case_index, _STREAM_LESION))
        structures["liver"] = structures["liver"] & ~lesion
        structures[LESION] = lesion
    return structures


# --------------------------------------------------------------------------------------
# Rendering (intensities)
# --------------------------------------------------------------------------------------

#: Contrast phases used for successive channels: the same anatomy with a different
#: intensity mapping, like a multi-phase CT.  Mean HU per tissue.
_PHASES: tuple[tuple[str, dict[str, float]], ...] = (
    ("portal_venous", {"soft": 40, "fat": -100, "marrow": 250, "cortex": 700, "aorta": 160,
                       "liver": 105, "kidney": 180, "spleen": 140, LESION: 50}),
    ("arterial", {"soft": 40, "fat": -100, "marrow": 250, "cortex": 700, "aorta": 300,
                  "liver": 75, "kidney": 220, "spleen": 150, LESION: 115}),
    ("native", {"soft": 40, "fat": -100, "marrow": 250, "cortex": 700, "aorta": 45,
                "liver": 60, "kidney": 32, "spleen": 48, LESION: 28}),
    ("delayed", {"soft": 40, "fat": -100, "marrow": 250, "cortex": 700, "aorta": 110,
                 "liver": 85, "kidney": 140, "spleen": 90, LESION: 45}),
)

#: Texture per tissue: (std in HU, correlation length in mm).  Differing texture (not only
#: mean) makes organs distinguishable the way real parenchyma is.
_TEXTURES: dict[str, tuple[float, float]] = {
    "soft": (10.0, 2.5),
    "fat": (6.0, 2.0),
    "liver": (9.0, 1.2),
    "kidney": (14.0, 2.0),
    "spleen": (5.0, 3.0),
    LESION: (12.0, 1.5),
}

# Painting order: later tissues overwrite earlier ones. (tissue intensity key, structure key)
_PAINT_ORDER: tuple[tuple[str, str], ...] = (
    ("soft", "body"), ("fat", "fat"), ("marrow", "spine"), ("cortex", "spine_cortex"), ("aorta", "aorta"),
    ("liver", "liver"), ("kidney", "kidney"), ("spleen", "spleen"), (LESION, LESION),
)


def channel_phase(channel: int) -> str:
    """Contrast-phase name of a channel (phases cycle; later cycles get stronger contrast)."""
    name = _PHASES[channel % len(_PHASES)][0]
    return name if channel < len(_PHASES) else f"{name}_{channel // len(_PHASES) + 1}"


def _phase_means(channel: int) -> dict[str, float]:
    """Mean HU per tissue for a channel; cycles phases and scales contrast so channels differ."""
    means = _PHASES[channel % len(_PHASES)][1]
    gain = 1.0 + 0.15 * (channel // len(_PHASES))
    return {k: means["soft"] + gain * (v - means["soft"]) for k, v in means.items()}


def _smooth_noise(grid: _Grid, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Unit-std correlated noise; correlation length is physical, so it is spacing-independent."""
    field = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), grid.sigma_voxels(sigma_mm))
    return field / max(float(field.std()), 1e-6)


def _textures(spec: SyntheticSpec, case_index: int, grid: _Grid,
              structures: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Anatomical texture fields (shared by all channels, like real tissue structure)."""
    out = {}
    for tissue_index, (tissue, (std, corr_mm)) in enumerate(_TEXTURES.items()):
        key = "body" if tissue == "soft" else tissue
        if key in structures:
            rng = _rng(spec, case_index, _STREAM_TEXTURE_BASE + tissue_index)
            out[tissue] = std * _smooth_noise(grid, rng, corr_mm)
    return out


def _bias_field(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative gain (low-order polynomial), like beam hardening / scanner drift."""
    z = grid.axes[0][:, None, None]
    y = grid.axes[1][None, :, None]
    x = grid.axes[2][None, None, :]
    coeffs = rng.uniform(-_BIAS_AMPLITUDE, _BIAS_AMPLITUDE, 6)
    terms: tuple[np.ndarray, ...] = (z, y, x, 2 * y * x, 2 * y**2, 2 * x**2)
    return 1.0 + sum(c * t for c, t in zip(coeffs, terms))


def _render_channel(spec: SyntheticSpec, case_index: int, channel: int, grid: _Grid,
                    structures: Mapping[str, np.ndarray], textures: Mapping[str, np.ndarray]) -> np.ndarray:
    """HU image of one channel: paint tissues, blur (PSF), bias on attenuation, add noise."""
    rng = _rng(spec, case_index, _STREAM_CHANNEL_BASE + channel)
    means = _phase_means(channel)
    image: np.ndarray = np.full(grid.shape, _AIR_HU, dtype=np.float32)
    for tissue, key in _PAINT_ORDER:
        if key not in structures:
            continue
        mask = structures[key]
        value = means[tissue] + (textures[tissue][mask] if tissue in textures else 0.0)
        image[mask] = value
    image = ndimage.gaussian_filter(image, grid.sigma_voxels(_PSF_SIGMA_MM))
    # Bias acts on attenuation (HU + 1000), so air stays near -1000 as in real CT.
    image = (image - _AIR_HU) * _bias_field(grid, rng) + _AIR_HU
    image += rng.normal(0.0, _NOISE_HU, grid.shape)
    return np.clip(image, *_HU_RANGE).astype(np.float32)


def _export_labels(masks: Mapping[str, np.ndarray], label_names: Sequence[str]) -> np.ndarray:
    """Label map (uint8) with ``label_names[i]`` -> i + 1; unlisted structures become background.

    This is the single place deciding which structures are annotated, so partially
    labelled variants only need to pass a different ``label_names``.
    """
    if len(label_names) > 254:
        raise ValueError(f"at most 254 labels fit into uint8, got {len(label_names)}.")
    label = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
    for value, name in enumerate(label_names, start=1):
        if name not in masks:
            raise ValueError(f"label {name!r} has no mask; available structures: {sorted(masks)}.")
        if np.any(label[masks[name]]):
            raise ValueError(f"label {name!r} overlaps an earlier label; labelled masks must be disjoint.")
        label[masks[name]] = value
    return label


def make_case(spec: SyntheticSpec, case_index: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image (C, Z, Y, X) float32 in HU and label (Z, Y, X) uint8.

    Deterministic in (spec, case_index); labels follow ``spec.label_names`` (id = position + 1).
    """
    _require_int(case_index, "case_index", minimum=0)
    structures = _synthesize_structures(spec, case_index)
    image = _render_image(spec, case_index, structures)
    return image, _export_labels(structures, spec.label_names)


def _render_image(spec: SyntheticSpec, case_index: int, structures: Mapping[str, np.ndarray]) -> np.ndarray:
    """All channels of a case stacked as (C, Z, Y, X) float32."""
    grid = _Grid.from_spec(spec)
    textures = _textures(spec, case_index, grid, structures)
    return np.stack([_render_channel(spec, case_index, c, grid, structures, textures)
                     for c in range(spec.num_channels)])


# --------------------------------------------------------------------------------------
# Writing nnU-Net v2 raw datasets (layout, dataset.json and staging: nnunet_ext.raw_dataset)
# --------------------------------------------------------------------------------------


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net v2 raw folder name ``DatasetXXX_Name`` (validates id and name)."""
    _validate_dataset_id(dataset_id)
    _validate_name(name)
    return raw_dataset.folder_name(dataset_id, name)


def case_identifier(case_index: int) -> str:
    """Case id used in file names; training cases come first, test cases continue the count."""
    return f"{CASE_PREFIX}_{case_index:03d}"


def _validate_dataset_id(dataset_id: int) -> None:
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id={dataset_id!r} must be an integer in 1..999 (nnU-Net uses three digits).")


def _validate_name(name: str) -> None:
    if not raw_dataset.is_valid_name(name):
        raise ValueError(f"name={name!r} must be non-empty and use only letters, digits, '_' or '-', "
                         f"e.g. 'SyntheticAbdomen'.")


def _metadata(spec: SyntheticSpec) -> dict[str, Any]:
    """What identifies data written by this generator; stored in dataset.json."""
    return {
        "generator": "nnunet_ext.datasets.synthetic",
        "generator_version": GENERATOR_VERSION,
        "spec": spec.to_json_dict(),
        "channel_phases": [channel_phase(c) for c in range(spec.num_channels)],
    }


def _dataset_json(spec: SyntheticSpec, name: str) -> dict[str, Any]:
    """dataset.json as nnU-Net v2 writes it (generate_dataset_json keys), plus the generator metadata.

    Every channel is named "CT": nnU-Net maps only the exact name "CT" to its CT
    normalisation (others fall back to z-score), and every phase of a contrast CT is
    HU-calibrated.  The phase of each channel is recorded in the metadata instead.
    """
    return raw_dataset.dataset_json(
        {str(c): "CT" for c in range(spec.num_channels)},
        {"background": 0, **{n: i for i, n in enumerate(spec.label_names, start=1)}},
        spec.num_training, FILE_ENDING, name=name,
        description="Synthetic abdominal CT-like volumes generated by nnunet_ext (deterministic).",
        reference="nnunet_ext.datasets.synthetic", licence="CC0-1.0", extra={METADATA_KEY: _metadata(spec)})


def _split(spec: SyntheticSpec, case_index: int) -> str:
    """"Tr" for training cases, "Ts" for test cases (which also get labels, in labelsTs)."""
    return "Tr" if case_index < spec.num_training else "Ts"


def _expected_files(spec: SyntheticSpec) -> list[str]:
    """Relative paths of every file the generator writes (used for completeness checks)."""
    files = [raw_dataset.DATASET_JSON]
    for index in range(spec.num_training + spec.num_test):
        split, case = _split(spec, index), case_identifier(index)
        files += [raw_dataset.image_file("", case, c, FILE_ENDING, split).as_posix() for c in range(spec.num_channels)]
        files.append(raw_dataset.label_file("", case, FILE_ENDING, split).as_posix())
    return files


def _write_case(folder: pathlib.Path, spec: SyntheticSpec, case_index: int, label_names: Sequence[str]) -> None:
    """Synthesize one case and write its channel files and label file."""
    structures = _synthesize_structures(spec, case_index)
    image = _render_image(spec, case_index, structures)
    raw_dataset.write_case_arrays(folder, case_identifier(case_index), list(image),
                                  _export_labels(structures, label_names), spec.spacing, FILE_ENDING,
                                  _split(spec, case_index))


def _write_cases(folder: pathlib.Path, spec: SyntheticSpec, label_names: Sequence[str]) -> None:
    """Every case of ``spec`` (training, then test), with a progress bar on a terminal."""
    for index in progress(range(spec.num_training + spec.num_test), desc="synthetic cases"):
        _write_case(folder, spec, index, label_names)


def _existing_matches(folder: pathlib.Path, spec: SyntheticSpec) -> bool:
    """True if ``folder`` is a complete dataset written by this generator with ``spec``."""
    try:
        stored = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stored, dict) or stored.get(METADATA_KEY) != _metadata(spec):
        return False
    return all((folder / f).is_file() for f in _expected_files(spec))


def write_synthetic_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str = "SyntheticAbdomen",
                            spec: SyntheticSpec = SyntheticSpec()) -> pathlib.Path:
    """Write ``<raw_root>/DatasetXXX_Name`` (imagesTr/labelsTr/imagesTs/labelsTs/dataset.json).

    Safe to call repeatedly: an identical existing dataset is returned untouched; any
    other existing content raises FileExistsError and is never modified.  Data is written
    to a private staging folder beside it and moved into place (:mod:`nnunet_ext.raw_dataset`),
    so an interrupted run never leaves a half-written dataset that looks complete.
    """
    if not isinstance(spec, SyntheticSpec):
        raise ValueError(f"spec must be a SyntheticSpec, got {type(spec).__name__}.")
    spec.validate()
    raw_root = pathlib.Path(raw_root)
    folder = raw_root / dataset_folder_name(dataset_id, name)
    if folder.exists() or folder.is_symlink():
        if _existing_matches(folder, spec):
            return folder
        if not folder.is_dir() or any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} already exists and was not written by this generator with the same spec; "
                f"it was left untouched. Choose another dataset_id/name or remove the folder yourself.")
    conflicts = raw_dataset.other_folders_with_id(raw_root, dataset_id, folder.name)
    if conflicts:
        raise FileExistsError(
            f"{raw_root} already holds {conflicts} with dataset id {dataset_id}; nnU-Net could not tell them "
            f"apart from {folder.name}. Choose another dataset_id.")
    with raw_dataset.new_dataset_folder(folder, SUBFOLDERS) as staging:
        _write_cases(staging, spec, spec.label_names)
        raw_dataset.write_dataset_json(staging, _dataset_json(spec, name))
    return folder
