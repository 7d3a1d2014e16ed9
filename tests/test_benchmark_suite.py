"""The benchmark suite (benchmarks/suite.py): its options, its report (ratios, markdown, JSON) and one
measured trainer row on the session's tiny dataset, in-process. The measured numbers are not checked
(benchmarks are not timed tests); that they exist and are divided by the right baseline is."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import suite  # noqa: E402
from suite_report import add_ratios, write_report  # noqa: E402


def test_presets_and_overrides():
    quick = suite.parse_args(["--quick"])
    assert (quick.iterations, quick.rounds, quick.compile, quick.sam_model_type) == (2, 3, False, "tiny")
    full = suite.parse_args([])
    assert (full.iterations, full.compile, full.sam_model_type) == (10, True, "vit_b")
    assert full.preset.plain.shape == (64, 160, 160)
    custom = suite.parse_args(["--quick", "--compile", "--iterations", "5", "--trainers", "UniSegTrainer",
                               "--no-mirroring", "--out", "x/y"])
    assert (custom.iterations, custom.compile, custom.trainers, custom.no_mirroring, custom.out) == \
        (5, True, ["UniSegTrainer"], True, "x/y")


@pytest.mark.parametrize("arguments, message", [
    (["--trainers", "UniSegTrainr"], "Unknown trainer 'UniSegTrainr'. Did you mean: UniSegTrainer"),
    (["--iterations", "0"], "--iterations must be at least 1"),
    (["--compile", "--no-compile"], "not allowed with argument"),
])
def test_bad_arguments_are_refused_with_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        suite.parse_args(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_cpu_is_timed_on_cpu_time_of_one_thread_unless_asked_otherwise(monkeypatch):
    cpu, cuda = {"type": "cpu", "cores": 2}, {"type": "cuda", "cores": 2}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(suite, "cpu_cores", lambda: 2)
    for argv, device, expected in ((["--quick"], cpu, ("cpu", 1)), (["--clock", "wall"], cpu, ("wall", 2)),
                                   (["--threads", "2"], cpu, ("cpu", 2)), ([], cuda, ("wall", 2))):
        args = suite.parse_args(argv)
        suite.resolve_clock(args, device)
        assert (args.clock, suite.measuring_threads(args, device)) == expected, argv
    with pytest.raises(SystemExit, match="--clock wall on CUDA"):
        suite.resolve_clock(suite.parse_args(["--clock", "cpu"]), cuda)


def test_trainers_take_turns_step_by_step_and_a_burst_of_load_does_not_move_the_median(monkeypatch):
    """train_epochs with stand-in trainers: warm-up epoch first, then the trainers alternate per step;
    epoch_s is the median step times the iterations, so one slow step (other jobs) is not the figure."""
    import suite_workers

    order, times = [], {"a": iter([9, 9, 1, 1, 50, 1, 1, 1]), "b": iter([9, 9, 2, 2, 2, 2, 2, 2])}
    monkeypatch.setattr(suite_workers, "start_trainer", lambda path, *rest: (path, None))
    monkeypatch.setattr(suite_workers, "_describe", lambda trainer, how: {})

    def fake_step(trainer, clock):
        assert clock == "cpu"
        order.append(trainer)
        return float(next(times[trainer])), 2

    monkeypatch.setattr(suite_workers, "timed_step", fake_step)
    results = suite_workers.train_epochs(["a", "b"], "", "3d_fullres", "cpu", 2, 3, False, None, False, "cpu")
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 6
    assert results["a"] == {"patches_per_iteration": 2, "first_epoch_s": 18.0, "epoch_s": 2.0, "iteration_s": 1.0,
                            "measured_steps": 6}
    assert (results["b"]["epoch_s"], results["b"]["measured_steps"]) == (4.0, 6)


def test_every_registered_trainer_gets_data_of_its_kind():
    kinds = {name: suite.trainer_kind(path) for name, path in suite.registered_trainers().items()}
    assert kinds["UniSegTrainer"] == kinds["TransDoDNetTrainer"] == kinds["nnUNetUniversalTrainer"] == "universal"
    assert kinds["MCNetPlusTrainer"] == kinds["LeFeDTrainer"] == "semi"
    assert kinds["ClassSAMTrainer"] == "class_sam"
    assert kinds["CoTrTrainer"] == kinds["nnUNetExtTrainer"] == "single"


def _report() -> dict:
    def row(trainer, group, baseline, eager, compiled=None):
        return {"trainer": trainer, "path": f"m:{trainer}", "group": group, "baseline": baseline, "eager": eager,
                "compiled": compiled or {}}

    settings = {"preset": "quick", "iterations": 2, "rounds": 1, "memory_steps": 2, "cases": 1, "compile": True,
                "mirroring": True, "memory_measure": "peak RSS growth", "clock": "cpu", "threads": 1, "cores": 2}
    return {"device": {"label": "CPU: Test CPU, 2 cores"}, "versions": {"torch": "9.9", "nnunetv2": "2.8.1"},
            "settings": settings, "command": "python benchmarks/suite.py --quick", "created": "today",
            "status": "complete", "load_average": [5.5, 3.25, None, 7.0],
            "groups": {"g": {"description": "plain", "configuration": "3d_fullres", "cases": "6/2",
                             "shape": [16, 40, 40], "baseline": "nnUNetTrainer"}},
            "rows": [row("nnUNetTrainer", "g", True, {"epoch_s": 2.0, "peak_memory_gb": 0.0, "predict_s_per_case": 4.0,
                                                      "patch_size": [16, 40, 40], "patches_per_iteration": 2,
                                                      "predict_gflop_per_patch": 0.5},
                         {"epoch_s": 1.0, "compile": "forced on CPU"}),
                     row("SlowTrainer", "g", False, {"epoch_s": 5.0, "peak_memory_gb": 1.5, "predict_s_per_case": 2.0,
                                                     "predict_gflop_per_patch": 0.25},
                         {"error": "BackendCompilerFailed: boom | bang", "compile": "forced on CPU"})]}


def test_ratios_divide_by_the_groups_baseline_and_by_eager():
    rows = add_ratios(_report())["rows"]
    assert rows[0]["ratios"]["epoch_vs_baseline"] == 1.0
    assert rows[0]["ratios"]["compiled_epoch_vs_eager"] == 0.5
    slow = rows[1]["ratios"]
    assert (slow["epoch_vs_baseline"], slow["predict_vs_baseline"], slow["flop_vs_baseline"]) == (2.5, 0.5, 0.5)
    assert slow["memory_vs_baseline"] is None  # a baseline of 0 (CPU peak RSS growth) divides nothing
    assert slow["compiled_epoch_vs_eager"] is None


def test_report_is_written_as_markdown_and_json(tmp_path):
    markdown_path, json_path = write_report(_report(), tmp_path / "results" / "cpu-quick")
    assert (markdown_path.name, json_path.name) == ("cpu-quick.md", "cpu-quick.json")
    text = markdown_path.read_text()
    assert text.startswith("# nnunet-ext benchmark suite: CPU: Test CPU, 2 cores")
    assert "torch 9.9, nnunetv2 2.8.1" in text and "`python benchmarks/suite.py --quick`" in text
    assert "- Times: CPU time of the measuring process (1 torch thread(s);" in text
    assert "- Machine load: 1-minute load average 3.2 to 7.0 (median 5.5) during the measurements, on 2 cores" in text
    assert "| SlowTrainer | g | - | 5.000 | 2.50x | 1.500 | - | 2.000 | 0.50x | 0.250 | 0.50x | - |" in text
    assert "| nnUNetTrainer | g | forced on CPU | 2.000 | 1.000 | 0.50x |" in text
    assert "BackendCompilerFailed: boom / bang" in text  # the failure is a row, the table stays a table
    assert json.loads(json_path.read_text())["rows"][1]["ratios"]["epoch_vs_baseline"] == 2.5


def _measure(root, tmp_path: Path, names: tuple[str, ...]) -> dict:
    """The suite's eager measurements of ``names`` (trainer paths) on the session's dataset, in this process
    (the suite uses fresh processes): training epochs of 1 iteration, peak memory (meaningless in-process,
    but present), inference of 1 case without mirroring."""
    env = {**suite._run_env(root), "nnUNet_results": str(tmp_path / "results")}
    group = suite.Group("plain-3d", "harness", str(root.preprocessed / root.dataset_name),
                        str(root.dataset_raw / "imagesTs"), "3d_fullres", names, env, "6/2", (16, 40, 40))
    args = suite.parse_args(["--quick", "--iterations", "1", "--rounds", "1", "--memory-steps", "1", "--no-mirroring"])
    report = suite.new_report(args, suite.device_info("cpu"), ["--quick"])
    report["groups"]["plain-3d"] = {"description": "harness", "configuration": "3d_fullres", "cases": "6/2",
                                    "shape": [16, 40, 40], "baseline": "nnUNetTrainer"}
    run = suite.Suite(report, tmp_path / "out" / "cpu", tmp_path / "work", "cpu", None, inline=True)
    run.measure(group, "eager", report["settings"])
    return report


def _check_measured(row: dict) -> None:
    measured = row["eager"]
    assert "error" not in measured and "skipped" not in measured, measured
    assert measured["epoch_s"] > 0 and measured["predict_s_per_case"] > 0 and measured["peak_memory_gb"] >= 0
    assert measured["predict_gflop_per_patch"] > 0  # counted on the predictor's network, one 16x40x40 patch
    assert measured["patch_size"] == [16, 40, 40] and measured["patches_per_iteration"] == 2
    assert "model_folder" not in measured  # temporary paths stay out of the report


def test_one_trainer_row_is_measured_on_tiny_shapes(nnunet_root, tmp_path):
    report = _measure(nnunet_root, tmp_path, (suite.registered_trainers()["nnUNetExtTrainer"],))
    (row,) = report["rows"]
    assert row["trainer"] == "nnUNetExtTrainer"
    _check_measured(row)
    assert "| nnUNetExtTrainer | plain-3d | 16x40x40 x 2 |" in (tmp_path / "out" / "cpu.md").read_text()


@pytest.mark.slow
def test_a_trainer_is_measured_against_nnunet_trainer(nnunet_root, tmp_path):
    report = _measure(nnunet_root, tmp_path, (suite.BASELINE, suite.registered_trainers()["nnUNetExtTrainer"]))
    baseline, row = report["rows"]
    assert (baseline["trainer"], row["trainer"], baseline["baseline"]) == ("nnUNetTrainer", "nnUNetExtTrainer", True)
    for measured in (baseline, row):
        _check_measured(measured)
    assert row["ratios"]["epoch_vs_baseline"] == pytest.approx(row["eager"]["epoch_s"] / baseline["eager"]["epoch_s"],
                                                                abs=1e-3)
    assert row["ratios"]["predict_vs_baseline"] == pytest.approx(
        row["eager"]["predict_s_per_case"] / baseline["eager"]["predict_s_per_case"], abs=1e-3)
    assert len(list((tmp_path / "work" / "predictions" / "plain-3d" / "eager").glob("model*/*.nii.gz"))) == 2


def test_nothing_starts_after_the_time_limit_and_the_table_says_so(tmp_path):
    group = suite.Group("plain-3d", "harness", str(tmp_path / "none"), str(tmp_path / "none"), "3d_fullres",
                        (suite.BASELINE,), {}, "6/2", (16, 40, 40))
    report = suite.new_report(suite.parse_args(["--quick"]), suite.device_info("cpu"), ["--quick"])
    report["groups"]["plain-3d"] = {"description": "harness", "configuration": "3d_fullres", "cases": "6/2",
                                    "shape": [16, 40, 40], "baseline": "nnUNetTrainer"}
    run = suite.Suite(report, tmp_path / "cpu", tmp_path / "work", "cpu", deadline=0.0, inline=True)
    run.measure(group, "eager", report["settings"])
    (row,) = report["rows"]
    assert row["eager"] == {"skipped": "training: time limit reached"}
    assert "| nnUNetTrainer | plain-3d | - | - | - | - | - | - | - | - | - | training: time limit reached |" in \
        (tmp_path / "cpu.md").read_text()
