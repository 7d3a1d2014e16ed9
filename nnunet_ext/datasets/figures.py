"""Overlay figure for demos: image slices with reference and predicted segmentations.

Why this exists: a quick visual check that a (tiny, quickly trained) model segments the
right structures is more convincing than Dice numbers alone, and it must render on
headless CI machines, so it draws with the Agg canvas and never touches pyplot's global
backend state.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from nnunet_ext import atomic_io

__all__ = ["save_overlay_figure", "save_prediction_figure", "select_slices"]

_REQUIRED_KEYS = ("name", "image", "reference", "prediction", "dice")
_OVERLAY_ALPHA = 0.45


def select_slices(reference: np.ndarray, count: int = 3) -> list[int]:
    """Axial slices with the most reference foreground, preferring ones that show new classes.

    Greedy: each pick maximises (number of classes not yet shown, foreground voxels), with
    a minimum distance between picks, so small structures (e.g. kidneys below the liver)
    appear in the figure instead of three near-identical neighbouring liver slices.  Falls
    back to evenly spaced slices when the reference has too few foreground slices.
    """
    depth = reference.shape[0]
    count = min(count, depth)
    flat = reference.reshape(depth, -1)
    foreground = (flat > 0).sum(axis=1)
    classes = [set(np.unique(flat[z]).tolist()) - {0} for z in range(depth)]
    min_gap = max(1, depth // (3 * count))
    chosen: list[int] = []
    shown: set = set()
    while len(chosen) < count:
        allowed = [z for z in range(depth) if foreground[z] > 0 and all(abs(z - c) >= min_gap for c in chosen)]
        if not allowed:
            break
        best = max(allowed, key=lambda z: (len(classes[z] - shown), foreground[z], -z))
        chosen.append(best)
        shown |= classes[best]
    fallback = [int(z) for z in np.linspace(0, depth - 1, count + 2)[1:-1].round()] + list(range(depth))
    for z in fallback:
        if len(chosen) == count:
            break
        if z not in chosen:
            chosen.append(z)
    return sorted(chosen)


def _class_colours(class_values: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """Fixed colour per class value so the same class looks the same in every row."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if max(class_values, default=0) <= 10 else colormaps["tab20"]
    n = cmap.N
    colours = {}
    for v in class_values:
        red, green, blue = cmap((v - 1) % n)[:3]
        colours[v] = (red, green, blue)
    return colours


def _overlay_rgba(seg: np.ndarray, colours: Mapping[int, tuple[float, float, float]]) -> np.ndarray:
    """Transparent RGBA image with each class filled in its colour."""
    rgba = np.zeros(seg.shape + (4,), dtype=np.float32)
    for value, colour in colours.items():
        mask = seg == value
        rgba[mask, :3] = colour
        rgba[mask, 3] = _OVERLAY_ALPHA
    return rgba


def _window(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Grey-value window around the labelled tissue's intensities (a soft-tissue window for CT).

    Percentiles of the whole image would be dominated by air in CT; windowing on the
    reference foreground works for HU and z-scored images alike.
    """
    finite = np.isfinite(image)
    values = image[finite & (reference > 0)]
    if values.size == 0:
        values = image[finite]
        if values.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(values, [1, 99])
    else:
        lo, hi = np.percentile(values, [1, 99])
        span = max(hi - lo, 1e-6)
        lo, hi = lo - span, hi + 0.5 * span
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _dice_text(dice: Mapping[str, float]) -> str:
    parts = []
    for name, value in dice.items():
        value = float(value)
        parts.append(f"{name} {value:.3f}" if math.isfinite(value) else f"{name} n/a")
    return "Dice: " + (", ".join(parts) if parts else "n/a")


def _validate_cases(cases: Sequence[Mapping[str, Any]]) -> None:
    if len(cases) == 0:
        raise ValueError("cases is empty; pass at least one case dict to plot.")
    for i, case in enumerate(cases):
        missing = [k for k in _REQUIRED_KEYS if k not in case]
        if missing:
            raise ValueError(f"cases[{i}] misses keys {missing}; each case needs {list(_REQUIRED_KEYS)}.")
        shapes = {k: np.shape(case[k]) for k in ("image", "reference", "prediction")}
        if len(set(shapes.values())) != 1 or len(shapes["image"]) != 3:
            raise ValueError(f"cases[{i}] ({case['name']!r}): image, reference and prediction must share one "
                             f"(Z, Y, X) shape, got {shapes}.")


def _draw_panel(ax: Any, image_slice: np.ndarray, seg_slice: np.ndarray, window: tuple[float, float],
                colours: Mapping[int, tuple[float, float, float]], title: str,
                contour_slice: np.ndarray | None = None) -> None:
    """Grey image + filled class overlay; optional reference contours for comparison."""
    ax.imshow(image_slice, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    ax.imshow(_overlay_rgba(seg_slice, colours), interpolation="nearest")
    if contour_slice is not None:
        for value, colour in colours.items():
            mask = contour_slice == value
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def save_overlay_figure(cases: list[dict], out_png: str | os.PathLike, class_names: dict[int, str]) -> pathlib.Path:
    """Save one row per case: 3 axial slices, each as reference and prediction overlay.

    ``class_names`` maps label value -> name (background 0 is ignored); the prediction
    panel also shows the reference as contours so misses and false positives stand out.
    Per-class Dice is written in each row title.  Returns the PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    _validate_cases(cases)
    names = {int(k): str(v) for k, v in class_names.items() if int(k) != 0}
    colours = _class_colours(sorted(names))
    n_slices = max(min(3, np.shape(c["image"])[0]) for c in cases)
    fig = Figure(figsize=(2.0 * 2 * n_slices, 2.3 * len(cases) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    rows = fig.subfigures(len(cases), 1, squeeze=False)[:, 0]
    for row, case in zip(rows, cases):
        image = np.asarray(case["image"], dtype=np.float32)
        reference = np.asarray(case["reference"])
        prediction = np.asarray(case["prediction"])
        slices = select_slices(reference, n_slices)
        window = _window(image[slices], reference[slices])
        axes = row.subplots(1, 2 * n_slices, squeeze=False)[0]
        for ax in axes[2 * len(slices):]:
            ax.set_axis_off()
        for j, z in enumerate(slices):
            _draw_panel(axes[2 * j], image[z], reference[z], window, colours, f"z={z} reference")
            _draw_panel(axes[2 * j + 1], image[z], prediction[z], window, colours, f"z={z} prediction",
                        contour_slice=reference[z])
        row.suptitle(f"{case['name']} | {_dice_text(case['dice'])}", fontsize=10)
    if names:
        handles = [Patch(color=colours[v], label=f"{v}: {n}") for v, n in sorted(names.items())]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_io.write_with(out, lambda temporary: fig.savefig(temporary, format="png", dpi=100))
    return out


def save_prediction_figure(raw: str | os.PathLike, predictions: str | os.PathLike, dataset_json: Mapping[str, Any],
                           out_png: str | os.PathLike, summary: Mapping[str, Any]) -> pathlib.Path:
    """:func:`save_overlay_figure` of every prediction in ``predictions`` of the raw dataset ``raw``'s test
    cases (channel 0 of imagesTs, reference labelsTs), with the Dice of nnU-Net's ``summary`` (its
    summary.json content). Files are read with the dataset's reader/writer (:mod:`nnunet_ext.image_io`)."""
    from nnunet_ext import image_io

    raw, predictions = pathlib.Path(raw), pathlib.Path(predictions)
    ending = dataset_json["file_ending"]
    class_names = {value: name for name, value in dataset_json["labels"].items() if value != 0}
    per_case = {pathlib.Path(case["prediction_file"]).name: case["metrics"] for case in summary["metric_per_case"]}
    files = sorted(predictions.glob(f"*{ending}"))
    rw = image_io.reader_writer(dataset_json, files[0]) if files else None
    cases = []
    for prediction_file in files:
        case_id = prediction_file.name[: -len(ending)]
        metrics = per_case.get(prediction_file.name, {})
        image, _ = image_io.read_images([raw / "imagesTs" / f"{case_id}_0000{ending}"], rw)
        cases.append({
            "name": case_id,
            "image": image[0],
            "reference": image_io.read_segmentation(raw / "labelsTs" / f"{case_id}{ending}", rw)[0],
            "prediction": image_io.read_segmentation(prediction_file, rw)[0],
            "dice": {class_names[int(k)]: float(v["Dice"]) for k, v in metrics.items() if int(k) in class_names},
        })
    return save_overlay_figure(cases, out_png, class_names)
