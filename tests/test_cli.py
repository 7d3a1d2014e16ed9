"""``nnunet-ext`` subcommands: list, env, doctor, plan, demo's guards."""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from nnunet_ext import _startup
from nnunet_ext.cli.main import main
from nnunet_ext.registry import METHODS, class_name, trainer_paths
from nnunet_ext.testing.harness import stock_command


def run_cli(*arguments, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([stock_command("nnunet-ext"), *map(str, arguments)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_list_names_every_registered_trainer_network_and_planner_with_its_paper(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for method in METHODS:
        names = [class_name(p) for p in method.trainers + method.planners] + [n.name for n in method.networks]
        for name in names:
            line = next((line for line in lines if line.split()[1] == name), None)
            assert line is not None, f"{name} not listed"
            assert method.paper in line and method.title in line


def test_env_prints_an_export_line_that_keeps_the_users_value(capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/my/trainers")
    assert main(["env"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("export nnUNet_extTrainer=")
    value = shlex.split(line.split("=", 1)[1])[0]
    assert value.split(os.pathsep) == ["/my/trainers", _startup.DISCOVERY_FOLDER]


def _env_without_nnunet_paths() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


@pytest.fixture
def empty_nnunet_folders(monkeypatch, tmp_path):
    """The three nnU-Net folder variables pointing at new empty folders (in this process)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path


def _without_nnunet_paths(monkeypatch) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)


# in-process: the `nnunet-ext` command is this main() (the plan test below runs it as a command), and
# test_discovery checks nnU-Net's lookup of every trainer from a plain shell
def test_doctor_fails_and_names_each_missing_folder_variable(tmp_path, monkeypatch, capsys):
    _without_nnunet_paths(monkeypatch)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "does_not_exist"))
    assert main(["doctor"]) == 1
    output = capsys.readouterr().out
    assert "nnUNet_raw: " + str(tmp_path / "does_not_exist") + " does not exist" in output
    assert "mkdir -p" in output
    assert "nnUNet_preprocessed: not set" in output and "export nnUNet_preprocessed=" in output
    assert "nnUNet_results: not set" in output


def test_doctor_passes_with_folders_set_and_reports_discovery_and_device(empty_nnunet_folders, capsys):
    assert main(["doctor"]) == 0, capsys.readouterr()
    output = capsys.readouterr().out
    assert f"nnU-Net finds all {len(trainer_paths())} trainers" in output
    assert "device:" in output and "Ready to train." in output


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_doctor_reports_an_unwritable_folder(tmp_path):
    from nnunet_ext.setup_checks import ERROR, check_path_variable

    (tmp_path / "ro").mkdir(mode=0o500)
    finding = check_path_variable("nnUNet_results", {"nnUNet_results": str(tmp_path / "ro")})
    assert finding.level == ERROR and "not writable" in finding.message


def test_plan_without_folder_variables_says_which_and_how(tmp_path):
    result = run_cli("plan", "-d", 5, "-pl", "ExperimentPlanner", env=_env_without_nnunet_paths())
    assert result.returncode == 2
    assert "nnUNet_raw: not set" in result.stderr and "export nnUNet_raw=" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_unknown_planner_lists_close_matches(empty_nnunet_folders, capsys):
    assert main(["plan", "-d", "5", "-pl", "nnUNetPlannerResEncMM"]) == 2
    error = capsys.readouterr().err
    assert "Unknown planner 'nnUNetPlannerResEncMM'" in error and "nnUNetPlannerResEncM" in error


def test_plan_refuses_a_negative_process_count(empty_nnunet_folders, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["plan", "-d", "5", "-pl", "ExperimentPlanner", "-np", "-1"])
    assert exited.value.code == 2
    assert "argument -np: must be 0 (no worker processes) or more, got -1" in capsys.readouterr().err


def test_plan_unknown_dataset_says_where_it_looked(empty_nnunet_folders, capsys):
    assert main(["plan", "-d", "123", "-pl", "ExperimentPlanner"]) == 2
    error = capsys.readouterr().err
    assert "Dataset123_<Name>" in error and str(empty_nnunet_folders / "nnUNet_raw") in error


def test_plan_resolves_our_planners_first_then_nnunets():
    from nnunet_ext.cli.plan import resolve_planner
    from nnunet_ext.plans.cpu_demo import CPUDemoPlanner

    from nnunet_ext.plans.cotr import CoTrPlanner

    assert resolve_planner("CPUDemoPlanner") is CPUDemoPlanner
    assert resolve_planner("CoTrPlanner") is CoTrPlanner
    assert resolve_planner("nnUNetPlannerResEncM").__module__.startswith("nnunetv2.experiment_planning")


def test_plan_runs_our_planner_and_the_plans_work_with_stock_preprocess(tmp_path):
    import json

    from nnunet_ext.testing.harness import make_nnunet_root, run_stock

    root = make_nnunet_root(tmp_path)
    env = root.env()
    result = run_cli("plan", "-d", root.dataset_id, "-pl", "CPUDemoPlanner", "-overwrite_plans_name", "MyPlans",
                     "-np", 0, env=env)  # fingerprint in the command's process
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plans_file = root.preprocessed / root.dataset_name / "MyPlans.json"
    plans = json.loads(plans_file.read_text())
    assert plans["experiment_planner_used"] == "CPUDemoPlanner"
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8
    assert f"nnUNetv2_preprocess -d {root.dataset_id} -plans_name MyPlans" in result.stdout
    run_stock(["nnUNetv2_preprocess", "-d", root.dataset_id, "-plans_name", "MyPlans", "-c", "3d_fullres",
               "-np", 1], env)
    assert list((root.preprocessed / root.dataset_name / "MyPlans_3d_fullres").iterdir())


def test_demo_refuses_a_foreign_non_empty_workdir_and_leaves_it_alone(tmp_path, capsys):
    (tmp_path / "my_data.nii.gz").write_bytes(b"precious")
    assert main(["demo", "--workdir", str(tmp_path), "--epochs", "1", "--iters", "1"]) == 2
    assert "not empty and was not made by 'nnunet-ext demo'" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["my_data.nii.gz"]
    assert (tmp_path / "my_data.nii.gz").read_bytes() == b"precious"


def test_demo_unknown_trainer_lists_close_matches(tmp_path, capsys):
    assert main(["demo", "--trainer", "nnUNetExtTrainr", "--workdir", str(tmp_path / "w")]) == 2
    error = capsys.readouterr().err
    assert "Unknown trainer 'nnUNetExtTrainr'" in error and "Did you mean: nnUNetExtTrainer" in error


def test_cli_help_works_for_every_subcommand():
    for command in ("list", "env", "doctor", "demo", "plan"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
