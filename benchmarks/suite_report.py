"""The benchmark suite's report (``benchmarks/suite.py``): ratios, a markdown table and the JSON.

A report is a dict: ``device``, ``versions``, ``settings``, ``groups`` (one per dataset and
configuration, each with its baseline trainer) and ``rows`` (one per trainer, the baseline included:
``eager`` and ``compiled`` measurements as the workers return them). :func:`add_ratios` divides
every row by its group's baseline row (time per epoch, peak memory, inference per case) and its
compiled by its eager measurements; :func:`write_report` writes ``<stem>.md`` and ``<stem>.json``
atomically, so a run stopped later leaves the last complete state.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nnunet_ext.atomic_io import write_json, write_text

#: row["ratios"] key -> (measurement set, measured key, divided by: "baseline" or "eager")
RATIOS = {
    "epoch_vs_baseline": ("eager", "epoch_s", "baseline"),
    "memory_vs_baseline": ("eager", "peak_memory_gb", "baseline"),
    "predict_vs_baseline": ("eager", "predict_s_per_case", "baseline"),
    "flop_vs_baseline": ("eager", "predict_gflop_per_patch", "baseline"),
    "compiled_epoch_vs_eager": ("compiled", "epoch_s", "eager"),
    "compiled_predict_vs_eager": ("compiled", "predict_s_per_case", "eager"),
}


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)) or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def add_ratios(report: dict) -> dict:
    """Set ``row["ratios"]`` for every row (None where a measurement is missing or the divisor is not
    positive, e.g. a CPU peak-RSS growth of 0); returns the report."""
    baselines = {row["group"]: row for row in report["rows"] if row.get("baseline")}
    for row in report["rows"]:
        baseline = baselines.get(row["group"], {})
        ratios = {}
        for name, (kind, key, divisor) in RATIOS.items():
            other = baseline.get("eager", {}) if divisor == "baseline" else row.get("eager", {})
            ratios[name] = _ratio(row.get(kind, {}).get(key), other.get(key))
        row["ratios"] = ratios
    return report


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "/").replace("\n", " ")


def _times(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _note(*measurements: dict) -> str:
    notes = []
    for measured in measurements:
        for key in ("error", "skipped"):
            if measured.get(key) and measured[key] not in notes:
                notes.append(measured[key])
    text = "; ".join(notes)
    return _cell(text[:160] + ("..." if len(text) > 160 else ""))


def _shape(measured: dict) -> str:
    patch = measured.get("patch_size")
    if not patch:
        return "-"
    per_iteration = measured.get("patches_per_iteration") or measured.get("batch_size")
    return f"{'x'.join(map(str, patch))} x {per_iteration}"


def _clock_text(settings: dict) -> str:
    threads = settings.get("threads")
    threads_text = f"{threads} torch thread(s)" if threads else "torch's default threads"
    if settings.get("clock") == "cpu":
        return (f"CPU time of the measuring process ({threads_text}; time.process_time), not elapsed time: other "
                f"jobs on a shared machine change it little")
    return f"elapsed time ({threads_text} on a CPU; CUDA synchronised before and after)"


def _load_text(report: dict) -> str:
    """The 1-minute load averages sampled before and after every measuring process."""
    loads = sorted(load for load in report.get("load_average", []) if load is not None)
    if not loads:
        return "not recorded"
    cores = report.get("settings", {}).get("cores") or report.get("device", {}).get("cores")
    median = loads[len(loads) // 2]
    return (f"1-minute load average {loads[0]:.1f} to {loads[-1]:.1f} (median {median:.1f}) during the "
            f"measurements" + (f", on {cores} cores" if cores else ""))


def header_lines(report: dict) -> list[str]:
    device, versions, settings = report["device"], report["versions"], report["settings"]
    versions_text = ", ".join(f"{name} {version}" for name, version in versions.items())
    lines = [f"# nnunet-ext benchmark suite: {device['label']}", "",
             f"- Device: {device['label']}",
             f"- Versions: {versions_text}",
             f"- Command: `{report['command']}` ({report['created']}; {report.get('status', 'complete')})",
             f"- Times: {_clock_text(settings)}",
             f"- Machine load: {_load_text(report)}",
             f"- Training: time per epoch of {settings['iterations']} `train_step` iteration(s) (batches made before "
             f"the clock starts): the median of {settings['rounds'] * settings['iterations']} measured steps times "
             f"{settings['iterations']}, after 1 warm-up epoch; the trainers of a dataset live in one process and "
             f"take turns step by step",
             f"- Peak memory: {settings['memory_measure']}, {settings['memory_steps']} iteration(s), each trainer "
             f"alone in a fresh process",
             f"- Inference: nnU-Net's predictor as `nnUNetv2_predict` configures it (mirroring "
             f"{'on' if settings['mirroring'] else 'off'}), `predict_from_files_sequential` per case "
             f"(preprocessing, sliding window, export), {settings['cases']} case(s) per dataset, median of "
             f"{settings['rounds']} round(s) after 1 warm-up round; task-conditioned models predict each case "
             f"as its own task",
             "- GFLOP/patch: one sliding-window step of the predicting network (batch 1, one patch), counted by "
             "PyTorch's FlopCounterMode (convolutions, matrix products; not grid_sample): independent of the load",
             "- Ratios: against `nnUNetTrainer` on the same dataset, plans and configuration, measured in the "
             "same run (x nnUNetv2_predict: its model predicting the same cases)"]
    return lines


def markdown(report: dict) -> str:
    """The report as markdown: header, datasets, the eager table and the eager-vs-compiled table."""
    lines = header_lines(report)
    lines += ["", "Datasets (synthetic, written and planned by nnU-Net in a temporary folder):", "",
              "| Data | Dataset | Configuration | Cases (train/test) | Image shape | Baseline |",
              "|---|---|---|---|---|---|"]
    for key, group in report["groups"].items():
        lines.append(f"| {key} | {_cell(group['description'])} | {group['configuration']} | {group['cases']} | "
                     f"{'x'.join(map(str, group['shape']))} | {group['baseline']} |")
    lines += ["", "## Training and inference (eager)", "",
              "| Trainer | Data | Patch x patches/it | Epoch (s) | x nnUNetTrainer | Peak memory (GB) | "
              "x nnUNetTrainer | Predict (s/case) | x nnUNetv2_predict | GFLOP/patch | x nnUNetv2_predict | Note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        eager, ratios = row.get("eager", {}), row.get("ratios", {})
        lines.append(f"| {row['trainer']} | {row['group']} | {_shape(eager)} | {_cell(eager.get('epoch_s'))} | "
                     f"{_times(ratios.get('epoch_vs_baseline'))} | {_cell(eager.get('peak_memory_gb'))} | "
                     f"{_times(ratios.get('memory_vs_baseline'))} | {_cell(eager.get('predict_s_per_case'))} | "
                     f"{_times(ratios.get('predict_vs_baseline'))} | {_cell(eager.get('predict_gflop_per_patch'))} | "
                     f"{_times(ratios.get('flop_vs_baseline'))} | {_note(eager)} |")
    if report["settings"].get("compile"):
        lines += ["", "## Eager vs compiled (`nnUNet_compile=t`)", "",
                  "| Trainer | Data | Compile | Epoch eager (s) | Epoch compiled (s) | compiled / eager | "
                  "First compiled epoch (s) | Predict eager (s/case) | Predict compiled (s/case) | compiled / eager "
                  "| Note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["rows"]:
            eager, compiled, ratios = row.get("eager", {}), row.get("compiled", {}), row.get("ratios", {})
            lines.append(f"| {row['trainer']} | {row['group']} | {_cell(compiled.get('compile'))} | "
                         f"{_cell(eager.get('epoch_s'))} | {_cell(compiled.get('epoch_s'))} | "
                         f"{_times(ratios.get('compiled_epoch_vs_eager'))} | {_cell(compiled.get('first_epoch_s'))} | "
                         f"{_cell(eager.get('predict_s_per_case'))} | {_cell(compiled.get('predict_s_per_case'))} | "
                         f"{_times(ratios.get('compiled_predict_vs_eager'))} | {_note(compiled)} |")
    else:
        lines += ["", "Eager vs compiled: not measured in this run (`--compile` measures it)."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` (ratios added first); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    add_ratios(report)
    markdown_path, json_path = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    write_json(json_path, report)
    write_text(markdown_path, markdown(report))
    return markdown_path, json_path
