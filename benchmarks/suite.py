"""The benchmark suite: every registered trainer against nnUNetTrainer on the same plans, in one run.

One command, unchanged on a GPU machine and on a CPU:

    python benchmarks/suite.py                  # CUDA if present: GPU shapes, eager and compiled
    python benchmarks/suite.py --quick          # small shapes, eager only: minutes on a 2-core CPU

It writes ``benchmarks/results/<device>[-quick].md`` and ``.json`` (``--out STEM`` for another place),
rewritten after every measurement, with the device, the torch/nnunetv2 versions and the settings at
the top. Per trainer of ``nnunet_ext/registry.py`` (``--trainers`` for some of them):

* time per training epoch (``--iterations`` calls of the trainer's own ``train_step``; the median step
  of ``--rounds`` epochs in which the trainers take turns step by step) and its ratio to
  ``nnUNetTrainer`` on the same dataset, plans and configuration (:func:`suite_workers.train_epochs`);
* peak memory of a few iterations and its ratio (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
  growth of the process's peak resident memory, ``ru_maxrss``; :func:`suite_workers.peak_memory`);
* inference time per case with nnU-Net's predictor, against ``nnUNetTrainer``'s model predicting the
  same cases as ``nnUNetv2_predict`` does (:func:`suite_workers.predict_cases`), and the FLOPs of one
  sliding-window step of the predicting network (:func:`suite_workers.patch_gflop`);
* with compile on (default except ``--quick``): the same epoch and inference measurements under
  ``nnUNet_compile=t``, as ratios to eager. nnU-Net's trainer never compiles on a CPU; there the suite
  switches nnU-Net's compile path on for every trainer that does not itself refuse compiling. A trainer
  that fails to compile is a row with the error, not a crash.

Data (synthetic, written and planned with nnU-Net's stock commands in a temporary folder, ``--workdir``
to keep it): single-dataset trainers on a plain dataset, semi-supervised ones on the same dataset plus
``imagesUnlabeled``, ClassSAM on its 2d configuration (``--sam-model-type``: ``tiny`` with ``--quick``,
else ``vit_b``; random SAM weights), universal trainers on the merged partially labelled family.
Model weights are the ones after the timed epochs (timing does not depend on them).

Times (``--clock``): on a CPU the CPU time of the measuring process with one torch thread by default
(``--threads``), which other jobs on a shared machine change little (elapsed time with two threads on
two busy cores varied 7-fold for the same step); ``--clock wall`` for elapsed time, the only clock on
CUDA. The 1-minute load average before and after every measuring process is in the report.

``--time-limit MINUTES``: no new measurement starts after it (the ones left are marked skipped), so a
run under a wall-clock limit still writes its table. Eager measurements of every dataset come first.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import suite_workers  # noqa: E402
from suite_report import write_report  # noqa: E402

from nnunet_ext.datasets.synthetic import SyntheticSpec  # noqa: E402

BASELINE = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer"
PLAIN_ID, PLAIN_NAME = 961, "SuitePlain"
UNIVERSAL_ID, UNIVERSAL_NAME = 964, "SuiteUniversal"
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Preset:
    plain: SyntheticSpec
    universal: SyntheticSpec
    unlabeled: int
    iterations: int
    rounds: int
    memory_steps: int
    cases: int
    compile: bool
    sam_model_type: str


PRESETS = {
    "quick": Preset(plain=SyntheticSpec(num_training=6, num_test=2, shape=(16, 40, 40), spacing=(2.5, 1.0, 1.0)),
                    universal=SyntheticSpec(num_training=4, num_test=1, shape=(16, 40, 40), spacing=(2.5, 1.0, 1.0)),
                    unlabeled=4, iterations=2, rounds=3, memory_steps=2, cases=1, compile=False,
                    sam_model_type="tiny"),
    "full": Preset(plain=SyntheticSpec(num_training=6, num_test=2, shape=(64, 160, 160), spacing=(2.5, 1.0, 1.0)),
                   universal=SyntheticSpec(num_training=4, num_test=1, shape=(64, 160, 160), spacing=(2.5, 1.0, 1.0)),
                   unlabeled=4, iterations=10, rounds=3, memory_steps=3, cases=2, compile=True,
                   sam_model_type="vit_b"),
}


@dataclass(frozen=True)
class Group:
    """Trainers measured together: one dataset, its nnUNetPlans, one configuration; baseline first."""

    key: str
    description: str
    dataset_folder: str  # nnU-Net's preprocessed folder of the dataset
    images: str  # raw test images (imagesTs)
    configuration: str
    trainers: tuple[str, ...]
    env: dict
    cases: str
    shape: tuple[int, ...]


# --- arguments -----------------------------------------------------------------------------------

def registered_trainers() -> dict[str, str]:
    from nnunet_ext.registry import trainer_paths

    return trainer_paths()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Defaults come from the preset (full, or --quick); the options below "
                                            "override single settings.")
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 iterations, eager only (CPU minutes)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when torch sees one (default)")
    parser.add_argument("--out", default=None,
                        help="output path without suffix (default benchmarks/results/<device>[-quick])")
    parser.add_argument("--trainers", nargs="+", default=None, metavar="NAME",
                        help="registered trainers to measure (default: all); nnUNetTrainer is always the baseline")
    parser.add_argument("--iterations", type=int, default=None, help="train_step calls per timed epoch")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed epochs (their steps, in turns) / inference rounds after warm-up")
    parser.add_argument("--memory-steps", type=int, default=None)
    parser.add_argument("--cases", type=int, default=None, help="test cases predicted per dataset")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="also measure nnUNet_compile=t (default except --quick)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-mirroring", action="store_true", help="predict without test-time mirroring")
    parser.add_argument("--sam-model-type", default=None, choices=["tiny", "vit_b", "vit_l", "vit_h"],
                        help="ClassSAM's SAM size, random weights (default tiny with --quick, else vit_b)")
    parser.add_argument("--clock", default=None, choices=["cpu", "wall"],
                        help="cpu: CPU time of the measuring process (default on a CPU; little changed by other "
                             "jobs on a shared machine); wall: elapsed time (CUDA: the only choice)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the measuring processes on a CPU (default 1 with --clock cpu, "
                             "else every core)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="start no measurement after this many minutes (the rest is marked skipped)")
    parser.add_argument("--workdir", default=None, help="keep datasets and models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    known = registered_trainers()
    for name in args.trainers or []:
        if name not in known:
            from nnunet_ext.registry import unknown_name_message

            parser.error(unknown_name_message("trainer", name, list(known)))
    for option in ("iterations", "rounds", "memory_steps", "cases", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, not {value}")
    preset = PRESETS["quick" if args.quick else "full"]
    for option in ("iterations", "rounds", "memory_steps", "cases", "compile", "sam_model_type"):
        if getattr(args, option) is None:
            setattr(args, option, getattr(preset, option))
    args.preset = preset
    return args


# --- device and versions -------------------------------------------------------------------------

def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def measuring_threads(args: argparse.Namespace, device: dict) -> int:
    """Torch threads of the measuring processes: ``--threads``, else 1 for the CPU clock (one thread
    burns no CPU time waiting for a sibling thread that other jobs keep off a core), else every core."""
    if args.threads:
        return args.threads
    if args.clock == "cpu" and device["type"] == "cpu":
        return 1
    return int(os.environ.get("OMP_NUM_THREADS", cpu_cores()))


def resolve_clock(args: argparse.Namespace, device: dict) -> None:
    """``args.clock``: as asked, else ``cpu`` on a CPU and ``wall`` on CUDA (CPU time says nothing of a GPU)."""
    if args.clock is None:
        args.clock = "cpu" if device["type"] == "cpu" else "wall"
    elif args.clock == "cpu" and device["type"] == "cuda":
        raise SystemExit("--clock cpu measures CPU time, not GPU time: use --clock wall on CUDA.")


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def device_info(requested: str) -> dict:
    import torch

    kind = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False).")
        name = torch.cuda.get_device_name(0)
        label = f"CUDA: {name} (CUDA {torch.version.cuda})"
    else:
        name = _cpu_model()
        label = f"CPU: {name}, {cpu_cores()} cores"
    slug = "cpu" if kind == "cpu" else "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return {"type": kind, "name": name, "label": label, "cores": cpu_cores(), "slug": slug}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    result = {"torch": torch.__version__}
    for package in ("nnunetv2", "dynamic-network-architectures", "nnunet-ext"):
        try:
            result[package] = version(package)
        except PackageNotFoundError:
            result[package] = "not installed"
    result["python"] = platform.python_version()
    return result


# --- data ----------------------------------------------------------------------------------------

def trainer_kind(import_path: str) -> str:
    """single, semi, universal or class_sam: which data and configuration the trainer needs."""
    from nnunet_ext.registry import import_object
    from nnunet_ext.trainers.class_sam import ClassSAMTrainer
    from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer
    from nnunet_ext.trainers.universal import nnUNetUniversalTrainer

    trainer = import_object(import_path)
    for base, kind in ((nnUNetUniversalTrainer, "universal"), (nnUNetSemiSupervisedTrainer, "semi"),
                       (ClassSAMTrainer, "class_sam")):
        if issubclass(trainer, base):
            return kind
    return "single"


def _stock_env(root) -> dict:
    """The root's environment for the stock commands, every core for torch."""
    env = root.env()
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(cpu_cores()))
    return env


def _run_env(root, threads: int | None = None) -> dict:
    """The environment of the measurements: a normal schedule (every trainer's learning rate is its first
    epoch's), batches made in the measuring process, outside the clock (``nnUNet_n_proc_DA=0``, which
    nnU-Net's planner cannot take: it sets torch's threads from it), ``threads`` torch threads (default
    as for the stock commands)."""
    env = root.env(epochs=1000, iterations=250)
    env.update(nnUNet_n_proc_DA="0", OMP_NUM_THREADS=str(threads or _stock_env(root)["OMP_NUM_THREADS"]))
    return env


def _processes() -> int:
    return max(1, min(8, cpu_cores()))


def plain_root(base: Path, spec: SyntheticSpec, configurations: list[str], unlabeled: int):
    """The plain synthetic dataset (+ ``imagesUnlabeled`` when ``unlabeled``), planned and preprocessed
    with ``nnUNetv2_plan_and_preprocess`` (and ``nnunet-ext preprocess-unlabeled``)."""
    from nnunet_ext.datasets.unlabeled import write_unlabeled_images
    from nnunet_ext.testing.harness import make_nnunet_root, run_stock

    root = make_nnunet_root(base / "plain", PLAIN_ID, PLAIN_NAME, spec)
    if unlabeled:
        write_unlabeled_images(root.raw, PLAIN_ID, PLAIN_NAME, spec, unlabeled)
    run_stock(["nnUNetv2_plan_and_preprocess", "-d", PLAIN_ID, "-c", *configurations, "-np", _processes(),
               "--verify_dataset_integrity"], _stock_env(root))
    if unlabeled:
        run_stock(["nnunet-ext", "preprocess-unlabeled", "-d", PLAIN_ID, "-c", "3d_fullres", "-np", _processes()],
                  _stock_env(root))
    return root


def universal_root(base: Path, spec: SyntheticSpec):
    """The synthetic partially labelled family (1, 2, 4 channels) merged with ``nnunet-ext merge``'s
    function, planned and preprocessed with ``nnUNetv2_plan_and_preprocess``."""
    from nnunet_ext.datasets.multi_dataset import DEFAULT_DATASET_IDS, write_multi_dataset
    from nnunet_ext.datasets.synthetic import dataset_folder_name
    from nnunet_ext.tasks.merge import merge_datasets
    from nnunet_ext.testing.harness import NnUNetRoot, run_stock

    root = NnUNetRoot(base / "universal", UNIVERSAL_ID, dataset_folder_name(UNIVERSAL_ID, UNIVERSAL_NAME))
    for folder in (root.raw, root.preprocessed, root.results):
        folder.mkdir(parents=True, exist_ok=True)
    write_multi_dataset(root.raw, spec=spec)
    merge_datasets(root.raw, list(DEFAULT_DATASET_IDS), UNIVERSAL_ID, UNIVERSAL_NAME)
    run_stock(["nnUNetv2_plan_and_preprocess", "-d", UNIVERSAL_ID, "-c", "3d_fullres", "-np", _processes(),
               "--verify_dataset_integrity"], _stock_env(root))
    return root


def _group(key: str, description: str, root, configuration: str, trainers: list[str], env: dict,
           spec: SyntheticSpec, cases: str) -> Group:
    return Group(key, description, str(root.preprocessed / root.dataset_name), str(root.dataset_raw / "imagesTs"),
                 configuration, (BASELINE, *trainers), env, cases, tuple(spec.shape))


def prepare_groups(base: Path, trainer_paths: list[str], preset: Preset, sam_model_type: str,
                   threads: int | None = None) -> list[Group]:
    """Write, plan and preprocess the datasets the trainers need; one group per dataset and configuration."""
    kinds = {path: trainer_kind(path) for path in trainer_paths}
    by_kind = {kind: [path for path in trainer_paths if kinds[path] == kind]
               for kind in ("single", "semi", "class_sam", "universal")}
    groups = []
    if by_kind["single"] or by_kind["semi"] or by_kind["class_sam"]:
        configurations = (["3d_fullres"] if by_kind["single"] or by_kind["semi"] else []) + \
                         (["2d"] if by_kind["class_sam"] else [])
        unlabeled = preset.unlabeled if by_kind["semi"] else 0
        root = plain_root(base, preset.plain, configurations, unlabeled)
        env = _run_env(root, threads)
        plain = preset.plain
        counts = f"{plain.num_training}/{plain.num_test}" + (f" + {unlabeled} unlabelled" if unlabeled else "")
        if by_kind["single"] or by_kind["semi"]:
            groups.append(_group("plain-3d", "plain synthetic (liver, kidney, spleen, lesion; 1 channel)"
                                 + (" + imagesUnlabeled" if unlabeled else ""), root, "3d_fullres",
                                 by_kind["single"] + by_kind["semi"], env, plain, counts))
        if by_kind["class_sam"]:
            sam_env = {**env, "NNUNET_EXT_SAM_MODEL_TYPE": sam_model_type, "NNUNET_EXT_SAM_RANDOM_INIT": "1"}
            groups.append(_group("plain-2d", f"plain synthetic, ClassSAM with SAM {sam_model_type} (random weights)",
                                 root, "2d", by_kind["class_sam"], sam_env, plain, counts))
    if by_kind["universal"]:
        root = universal_root(base, preset.universal)
        spec = preset.universal
        groups.append(_group("universal-3d", "merged partially labelled family (3 tasks; 1, 2, 4 channels)", root,
                             "3d_fullres", by_kind["universal"], _run_env(root, threads), spec,
                             f"3 x {spec.num_training}/{spec.num_test}"))
    return groups


def pick_cases(images: str, count: int) -> dict[str, list[str]]:
    """The first ``count`` cases of an imagesTs folder (case id -> channel files, nnU-Net's naming)."""
    cases: dict[str, list[str]] = {}
    for image in sorted(Path(images).glob("*_0000.nii.gz")):
        case = image.name[:-len("_0000.nii.gz")]
        cases[case] = sorted(str(p) for p in Path(images).glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz"))
    return dict(list(cases.items())[:count])


# --- measuring -----------------------------------------------------------------------------------

def _short(path: str) -> str:
    return path.rsplit(":", 1)[1]


class Suite:
    """The run: its report (rewritten to ``out`` after every measurement) and the phases."""

    def __init__(self, report: dict, out: Path, workdir: Path, device: str, deadline: float | None,
                 inline: bool = False, preload: tuple[str, ...] = ()):
        self.report, self.out, self.workdir, self.device, self.deadline = report, out, workdir, device, deadline
        self.inline, self.preload = inline, preload
        self.models: dict[tuple[str, str], str] = {}  # (group, trainer path) -> model folder (eager training)

    def rows(self, group: Group) -> dict[str, dict]:
        existing = {(row["group"], row["path"]): row for row in self.report["rows"]}
        result = {}
        for path in group.trainers:
            if (group.key, path) not in existing:
                row = {"trainer": _short(path), "path": path, "group": group.key, "baseline": path == BASELINE,
                       "eager": {}, "compiled": {}}
                self.report["rows"].append(row)
                existing[(group.key, path)] = row
            result[path] = existing[(group.key, path)]
        return result

    def _late(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def _run(self, function, arguments: tuple, env: dict):
        """``function(*arguments)`` in a measuring process; the machine's load before and after it goes
        into the report (``load_average``), to be stated next to the times."""
        loads = self.report.setdefault("load_average", [])
        loads.append(load_average())
        try:
            return suite_workers.run(function, arguments, env, self.inline, self.preload)
        finally:
            loads.append(load_average())

    def _skip(self, rows, mode: str, what: str) -> None:
        for row in rows:
            row[mode].setdefault("skipped", f"{what}: time limit reached")

    def save(self) -> None:
        write_report(self.report, self.out)

    def measure(self, group: Group, mode: str, settings: dict) -> None:
        """Training epochs, then (eager) peak memory, then inference of every trainer of ``group``."""
        rows = self.rows(group)
        compiled = mode == "compiled"
        env = {**group.env, "nnUNet_compile": "t" if compiled else "f"}
        if self._late():
            self._skip(rows.values(), mode, "training")
            self.save()
            return
        trained = self._run(suite_workers.train_epochs,
                            (list(group.trainers), group.dataset_folder, group.configuration, self.device,
                             settings["iterations"], settings["rounds"], compiled, self.deadline, not compiled,
                             settings["clock"]), env)
        self._merge(rows, mode, trained)
        for path, row in rows.items():
            if row[mode].get("model_folder"):
                self.models[(group.key, path)] = row[mode].pop("model_folder")
        self.save()
        if not compiled:
            for path, row in rows.items():
                if self._late():
                    self._skip([row], mode, "memory")
                    continue
                if "error" in row[mode]:
                    continue
                memory = self._run(suite_workers.peak_memory, (path, group.dataset_folder, group.configuration,
                                                               self.device, settings["memory_steps"], False), env)
                self._merge({path: row}, mode, {path: memory})
                self.save()
        models = {path: self.models[(group.key, path)] for path, row in rows.items()
                  if (group.key, path) in self.models and "skipped" not in row[mode]}
        if self._late():
            self._skip(rows.values(), mode, "inference")
        elif models:
            cases = pick_cases(group.images, settings["cases"])
            output = self.workdir / "predictions" / group.key / mode
            predicted = self._run(suite_workers.predict_cases,
                                  (models, cases, str(output), self.device, settings["rounds"],
                                   settings["mirroring"], self.deadline, settings["clock"]), env)
            self._merge(rows, mode, predicted)
        self.save()

    @staticmethod
    def _merge(rows: dict[str, dict], mode: str, measured: dict) -> None:
        if "error" in measured and not any(path in measured for path in rows):  # the whole process failed
            measured = {path: {"error": measured["error"]} for path in rows}
        for path, values in measured.items():
            if path not in rows:
                continue
            target = rows[path][mode]
            for key, value in values.items():
                if key == "traceback":
                    continue
                if key == "error" and target.get("error"):
                    value = f"{target['error']}; {value}"
                target[key] = value


def new_report(args: argparse.Namespace, device: dict, argv: list[str] | None) -> dict:
    resolve_clock(args, device)
    settings = {"preset": "quick" if args.quick else "full", "iterations": args.iterations, "rounds": args.rounds,
                "memory_steps": args.memory_steps, "cases": args.cases, "compile": args.compile,
                "mirroring": not args.no_mirroring, "sam_model_type": args.sam_model_type, "clock": args.clock,
                "threads": measuring_threads(args, device), "cores": device["cores"],
                "memory_measure": "torch.cuda.max_memory_allocated" if device["type"] == "cuda" else
                "CPU peak resident memory growth (ru_maxrss) over the process's state after on_train_start",
                "time_limit_minutes": args.time_limit}
    command = "python benchmarks/suite.py" + ("" if not argv else " " + shlex.join(argv))
    return {"benchmark": "nnunet_ext_suite", "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command, "device": device, "versions": versions(), "settings": settings, "groups": {},
            "rows": [], "status": "running"}


def run_suite(args: argparse.Namespace, workdir: Path, argv: list[str] | None = None) -> dict:
    device = device_info(args.device)
    start = time.time()
    deadline = start + 60 * args.time_limit if args.time_limit else None
    known = registered_trainers()
    trainer_paths = [known[name] for name in (args.trainers or list(known))]
    out = Path(args.out) if args.out else RESULTS / (device["slug"] + ("-quick" if args.quick else ""))
    report = new_report(args, device, argv)
    threads = report["settings"]["threads"]
    groups = prepare_groups(workdir, trainer_paths, args.preset, args.sam_model_type, threads)
    if report["settings"]["clock"] == "cpu":
        # nnU-Net's export (inside the timed prediction) runs nnUNet_def_n_proc torch threads (default 8),
        # read when nnunetv2 is imported: the measuring threads too, set before the measuring processes'
        # forkserver starts and imports nnunetv2
        os.environ["nnUNet_def_n_proc"] = str(threads)
    for group in groups:
        report["groups"][group.key] = {"description": group.description, "configuration": group.configuration,
                                       "cases": group.cases, "shape": list(group.shape),
                                       "baseline": _short(BASELINE)}
    modules = tuple(sorted({path.split(":")[0] for path in trainer_paths}))
    suite = Suite(report, out, workdir, device["type"], deadline, preload=modules)
    for group in groups:
        print(f"[suite] {group.key}: eager ({len(group.trainers)} trainers)", file=sys.stderr, flush=True)
        suite.measure(group, "eager", report["settings"])
    if args.compile:
        for group in groups:
            print(f"[suite] {group.key}: compiled", file=sys.stderr, flush=True)
            suite.measure(group, "compiled", report["settings"])
    report["status"] = f"complete in {(time.time() - start) / 60:.1f} min" + \
                       ("; some measurements skipped at the time limit" if deadline and time.time() > deadline else "")
    suite.save()
    print(f"[suite] wrote {out}.md and {out}.json", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        run_suite(args, Path(args.workdir).resolve(), argv)
    else:
        with tempfile.TemporaryDirectory(prefix="nnunet-ext-suite-") as folder:
            run_suite(args, Path(folder), argv)


if __name__ == "__main__":
    main()
