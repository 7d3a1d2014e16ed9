"""``nnunet-ext slurm``: the job description, the DAG, and the sbatch scripts (parsed, bash -n, and run on stubs)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster_stubs import DATASET_ID, fold_dir, stub_calls, stub_env
from nnunet_ext.cli.main import main
from nnunet_ext.cluster import slurm
from nnunet_ext.cluster.predict_best import inference_commands
from nnunet_ext.cluster.spec import EXAMPLE_PLAN, build_spec
from nnunet_ext.cluster.workflow import build_workflow
from nnunet_ext.errors import UserFacingError

TRAINERS = ["nnUNetExtTrainer", "BANetTrainer"]
CONFIGURATIONS = ["3d_fullres", "3d_lowres"]
FOLDS = [0, 1, 2, 3, 4]
FLAGS = ["-d", str(DATASET_ID), "-c", *CONFIGURATIONS, "-tr", *TRAINERS, "-f", *map(str, FOLDS),
         "--account", "proj42", "--partition-cpu", "cpuq", "--partition-gpu", "gpuq", "--gpus-per-job", "2",
         "--time-train", "47:00:00", "--mem", "64G", "--setup", "module load cuda/12.1",
         "--setup", "source /opt/venv/bin/activate", "--predict-input", "/data/imagesTs",
         "--predict-output", "/data/pred", "--submit-challenge", "kits21", "--submit-output", "/data/submission",
         "--env", "nnUNet_raw=/data/raw", "--env", "nnUNet_preprocessed=/data/pre", "--env", "nnUNet_results=/data/res"]
PLAN = {"dataset": DATASET_ID, "configurations": CONFIGURATIONS, "trainers": TRAINERS, "folds": FOLDS,
        "account": "proj42", "partition_cpu": "cpuq", "partition_gpu": "gpuq", "gpus_per_job": 2,
        "time_train": "47:00:00", "mem": "64G", "setup": ["module load cuda/12.1", "source /opt/venv/bin/activate"],
        "predict_input": "/data/imagesTs", "predict_output": "/data/pred", "submit_challenge": "kits21",
        "submit_output": "/data/submission",
        "environment": {"nnUNet_raw": "/data/raw", "nnUNet_preprocessed": "/data/pre", "nnUNet_results": "/data/res"}}


def sbatch_lines(text: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines of a script -> {key: value} (flags without a value -> "")."""
    options = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            options[key] = value
    return options


def generated(tmp_path: Path, *extra: str) -> dict[str, str]:
    out = tmp_path / "jobs"
    assert main(["slurm", *FLAGS, *extra, "--out", str(out)]) == 0
    return {p.name: p.read_text() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def jobs(tmp_path):
    return generated(tmp_path)


def test_one_script_per_step_in_dag_order(jobs):
    assert sorted(jobs) == ["01_preprocess.sbatch", "02_train.sbatch", "03_find_best.sbatch", "04_predict.sbatch",
                            "05_submit.sbatch", "common.sh", "setup.sh", "submit_all.sh"]


def test_training_array_has_one_task_per_trainer_configuration_and_fold(jobs):
    options = sbatch_lines(jobs["02_train.sbatch"])
    assert options["--array"] == f"0-{len(TRAINERS) * len(CONFIGURATIONS) * len(FOLDS) - 1}"  # 0-19
    for name, values in (("TRAINER", TRAINERS), ("CONFIGURATION", CONFIGURATIONS)):
        line = next(l for l in jobs["02_train.sbatch"].splitlines() if l.startswith(f"TASK_{name}=("))
        assert set(line[len(f"TASK_{name}=("):-1].split()) == set(values)
    for script in ("01_preprocess.sbatch", "03_find_best.sbatch", "04_predict.sbatch", "05_submit.sbatch"):
        assert "--array" not in sbatch_lines(jobs[script])


def test_every_array_index_runs_its_own_trainer_configuration_and_fold(tmp_path, jobs):
    env = stub_env(tmp_path)
    jobs_dir = tmp_path / "jobs"
    _use_stub_folders(jobs_dir, env)
    Path(env["nnUNet_preprocessed"], "Dataset017_Stub").mkdir(parents=True)
    expected = [(t, c, f) for t in TRAINERS for c in CONFIGURATIONS for f in FOLDS]
    for index, (trainer, configuration, fold) in enumerate(expected):
        result = _bash(jobs_dir / "02_train.sbatch", env, SLURM_ARRAY_TASK_ID=str(index))
        assert result.returncode == 0, result.stderr
    calls = [c for c in stub_calls(env) if c.startswith("nnUNetv2_train")]
    assert calls == [f"nnUNetv2_train {DATASET_ID} {c} {f} -tr {t} -p nnUNetPlans -num_gpus 2 -device cuda --npz"
                     for t, c, f in expected]
    bad = _bash(jobs_dir / "02_train.sbatch", env, SLURM_ARRAY_TASK_ID="20")
    assert bad.returncode == 2 and "SLURM_ARRAY_TASK_ID must be 0..19" in bad.stderr


def test_submit_all_chains_the_steps_with_afterok_on_the_real_job_ids(tmp_path, jobs):
    text = jobs["submit_all.sh"]
    assert "sbatch --parsable" in text
    chain = re.findall(r"^JOB_(\w+)=\$\(submit (?:--dependency=afterok:(\S+) --kill-on-invalid-dep=yes )?(\S+)\)$",
                       text, re.MULTILINE)
    assert [(step, dep) for step, dep, _ in chain] == [
        ("preprocess", ""), ("train", "${JOB_preprocess}"), ("find_best", "${JOB_train}"),
        ("predict", "${JOB_find_best}"), ("submit", "${JOB_predict}")]
    # run it with a fake sbatch that hands out ids (with a cluster suffix, as --parsable does on federations)
    env = stub_env(tmp_path)
    fake = Path(env["PATH"].split(os.pathsep)[0]) / "sbatch"
    fake.write_text('#!/bin/bash\necho "sbatch $*" >> "$STUB_LOG"\nn=$(wc -l < "$STUB_LOG")\necho "$((1000 + n));c1"\n')
    fake.chmod(0o755)
    _use_stub_folders(tmp_path / "jobs", env)
    result = _bash(tmp_path / "jobs" / "submit_all.sh", env)
    assert result.returncode == 0, result.stderr
    calls = [c.split() for c in stub_calls(env) if c.startswith("sbatch")]
    assert calls[0][1:] == ["--parsable", str(tmp_path / "jobs" / "01_preprocess.sbatch")]
    for previous, call in zip(range(1001, 1005), calls[1:]):
        assert call[2] == f"--dependency=afterok:{previous}" and call[3] == "--kill-on-invalid-dep=yes"
    assert "scancel 1001 1002 1003 1004 1005" in result.stdout


def test_submit_all_without_sbatch_points_to_the_local_runner(tmp_path, jobs):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if shutil.which("sbatch", path=env["PATH"]):
        pytest.skip("sbatch is installed here")
    result = _bash(tmp_path / "jobs" / "submit_all.sh", env)
    assert result.returncode == 2 and "--local" in result.stderr


def test_training_is_requeueable_and_only_training(jobs):
    train = sbatch_lines(jobs["02_train.sbatch"])
    assert "--requeue" in train and train["--signal"] == "B:USR1@300" and train["--open-mode"] == "append"
    for script in ("01_preprocess.sbatch", "03_find_best.sbatch", "04_predict.sbatch", "05_submit.sbatch"):
        assert "--requeue" not in sbatch_lines(jobs[script])


def test_resources_partition_account_gpus_time_mem_and_setup(jobs):
    train, predict = sbatch_lines(jobs["02_train.sbatch"]), sbatch_lines(jobs["04_predict.sbatch"])
    assert train["--partition"] == predict["--partition"] == "gpuq"
    assert train["--gres"] == "gpu:2" and train["--cpus-per-task"] == "16" and train["--time"] == "47:00:00"
    assert "-num_gpus 2" in jobs["02_train.sbatch"]
    assert predict["--gres"] == "gpu:1"
    for script in ("01_preprocess.sbatch", "03_find_best.sbatch", "05_submit.sbatch"):
        options = sbatch_lines(jobs[script])
        assert options["--partition"] == "cpuq" and "--gres" not in options
    for script in ("01_preprocess.sbatch", "02_train.sbatch", "03_find_best.sbatch", "04_predict.sbatch",
                   "05_submit.sbatch"):
        options = sbatch_lines(jobs[script])
        assert options["--account"] == "proj42" and options["--mem"] == "64G" and options["--nodes"] == "1"
        assert "source " in jobs[script] and "common.sh" in jobs[script]
    assert jobs["setup.sh"].endswith("\nmodule load cuda/12.1\nsource /opt/venv/bin/activate\n")
    assert 'if under_slurm; then source "$JOBS_DIR/setup.sh"; fi' in jobs["common.sh"]
    assert "export nnUNet_results=/data/res" in jobs["common.sh"]


def test_commands_of_the_steps(jobs):
    assert f"nnUNetv2_plan_and_preprocess -d {DATASET_ID} -c 3d_fullres 3d_lowres -np 8 --verify_dataset_integrity" \
        in jobs["01_preprocess.sbatch"]
    assert (f"nnUNetv2_find_best_configuration {DATASET_ID} -c 3d_fullres 3d_lowres -tr nnUNetExtTrainer BANetTrainer "
            f"-p nnUNetPlans -f 0 1 2 3 4 -np 8") in jobs["03_find_best.sbatch"]
    assert f"python -m nnunet_ext.cluster.predict_best -d {DATASET_ID} -i /data/imagesTs -o /data/pred -device cuda" \
        in jobs["04_predict.sbatch"]
    assert "nnunet-ext submit kits21 /data/pred /data/submission --images /data/imagesTs" in jobs["05_submit.sbatch"]


def test_every_generated_script_passes_bash_n(tmp_path, jobs):
    cascade = generated(tmp_path / "cascade", "-c", "3d_fullres", "3d_lowres", "3d_cascade_fullres", "-pl",
                        "CoTrPlanner", "-p", "nnUNetPlans_CoTr", "--preprocess-unlabeled", "--max-parallel", "4")
    for name, text in [*jobs.items(), *cascade.items()]:
        result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_json_plan_and_flags_give_the_same_scripts(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    from_flags = generated(tmp_path / "a")
    assert main(["slurm", str(plan), "--out", str(tmp_path / "a" / "jobs")]) == 0
    from_file = {p.name: p.read_text() for p in sorted((tmp_path / "a" / "jobs").iterdir()) if p.is_file()}
    assert from_file == from_flags
    # a flag next to the file overrides its key
    assert main(["slurm", str(plan), "--time-train", "10:00:00", "--out", str(tmp_path / "b")]) == 0
    assert sbatch_lines((tmp_path / "b" / "02_train.sbatch").read_text())["--time"] == "10:00:00"


def test_cascade_trains_after_lowres_and_preprocesses_fullres_once(tmp_path):
    jobs = generated(tmp_path, "-c", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
    assert "-c 3d_fullres 3d_lowres -np" in jobs["01_preprocess.sbatch"]
    assert sbatch_lines(jobs["02_train.sbatch"])["--array"] == "0-19"
    assert sbatch_lines(jobs["03_train_cascade.sbatch"])["--array"] == "0-9"
    assert "--dependency=afterok:${JOB_train} --kill-on-invalid-dep=yes" in \
        next(l for l in jobs["submit_all.sh"].splitlines() if l.startswith("JOB_train_cascade="))
    assert "afterok:${JOB_train_cascade}" in \
        next(l for l in jobs["submit_all.sh"].splitlines() if l.startswith("JOB_find_best="))


def test_planner_plans_and_unlabelled_preprocessing(tmp_path):
    jobs = generated(tmp_path, "-pl", "CoTrPlanner", "-p", "nnUNetPlans_CoTr", "--preprocess-unlabeled")
    text = jobs["01_preprocess.sbatch"]
    assert "nnunet-ext plan -d 17 -pl CoTrPlanner -c 3d_fullres 3d_lowres -np 8 -overwrite_plans_name " \
           "nnUNetPlans_CoTr --verify_dataset_integrity" in text
    assert "nnunet-ext preprocess-unlabeled -d 17 -c 3d_fullres 3d_lowres -p nnUNetPlans_CoTr -np 8" in text
    assert "skip_if_done nnUNetPlans_CoTr.json" in text
    assert "PLANS=nnUNetPlans_CoTr\n" in jobs["02_train.sbatch"] and '-p "$PLANS"' in jobs["02_train.sbatch"]
    assert "__${PLANS}__" in jobs["02_train.sbatch"]


@pytest.mark.parametrize("files, extra, expected", [
    (("checkpoint_latest.pth",), "--c", "resuming from"),
    (("checkpoint_final.pth",), "--val", "validation only"),
    (("checkpoint_final.pth", "validation/summary.json"), "--val", "validation only"),  # npz missing
    ((), "", ""),
])
def test_training_resumes_with_c_and_validates_a_finished_fold(tmp_path, jobs, files, extra, expected):
    env = stub_env(tmp_path)
    _use_stub_folders(tmp_path / "jobs", env)
    Path(env["nnUNet_preprocessed"], "Dataset017_Stub").mkdir(parents=True)
    fold = fold_dir(env, "BANetTrainer", "3d_lowres", 3)
    for name in files:
        (fold / name).parent.mkdir(parents=True, exist_ok=True)
        (fold / name).touch()
    index = [(t, c, f) for t in TRAINERS for c in CONFIGURATIONS for f in FOLDS].index(("BANetTrainer", "3d_lowres", 3))
    result = _bash(tmp_path / "jobs" / "02_train.sbatch", env, SLURM_ARRAY_TASK_ID=str(index))
    assert result.returncode == 0, result.stderr
    (call,) = stub_calls(env)
    assert call.endswith("--npz" + (f" {extra}" if extra else ""))
    assert expected in result.stdout


def test_a_trained_and_validated_fold_is_skipped(tmp_path, jobs):
    env = stub_env(tmp_path)
    _use_stub_folders(tmp_path / "jobs", env)
    Path(env["nnUNet_preprocessed"], "Dataset017_Stub").mkdir(parents=True)
    fold = fold_dir(env, "nnUNetExtTrainer", "3d_fullres", 0)
    (fold / "validation").mkdir(parents=True)
    for name in ("checkpoint_final.pth", "validation/summary.json", "validation/case_1.npz"):
        (fold / name).touch()
    result = _bash(tmp_path / "jobs" / "02_train.sbatch", env, SLURM_ARRAY_TASK_ID="0")
    assert result.returncode == 0 and "skipping" in result.stdout and stub_calls(env) == []


def test_under_slurm_usr1_requeues_the_job_at_most_max_requeues_times(tmp_path, jobs):
    env = stub_env(tmp_path, SLURM_JOB_ID="4242", SLURM_ARRAY_TASK_ID="0", STUB_SLEEP="3")
    _use_stub_folders(tmp_path / "jobs", env)
    Path(env["nnUNet_preprocessed"], "Dataset017_Stub").mkdir(parents=True)
    started = Path(env["STUB_LOG"] + ".started")
    for restarts, requeued in (("0", True), ("20", False)):
        started.unlink(missing_ok=True)
        Path(env["STUB_LOG"]).unlink(missing_ok=True)
        shutil.rmtree(env["nnUNet_results"], ignore_errors=True)
        process = subprocess.Popen(["bash", str(tmp_path / "jobs" / "02_train.sbatch")],
                                   env={**env, "SLURM_RESTART_COUNT": restarts},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the training stub did not start"
        process.send_signal(signal.SIGUSR1)  # what SLURM sends --signal=B:USR1@300 before the time limit
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err  # the script waited for training after the trap
        calls = stub_calls(env)
        assert ("scontrol requeue 4242" in calls) is requeued, (calls, out)
        assert ("requeueing job 4242" in out) is requeued and ("not again" in out) is not requeued


def test_setup_lines_run_only_inside_a_slurm_job(tmp_path):
    generated(tmp_path, "--setup", "echo SETUP_RAN")
    env = stub_env(tmp_path)
    _use_stub_folders(tmp_path / "jobs", env)
    local = _bash(tmp_path / "jobs" / "03_find_best.sbatch", env)
    assert local.returncode == 0 and "SETUP_RAN" not in local.stdout
    in_job = _bash(tmp_path / "jobs" / "03_find_best.sbatch", env, SLURM_JOB_ID="7")
    assert in_job.returncode == 0 and "SETUP_RAN" in in_job.stdout
    as_local_runner = _bash(tmp_path / "jobs" / "03_find_best.sbatch", env, SLURM_JOB_ID="7", NNUNET_EXT_LOCAL="1")
    assert "SETUP_RAN" not in as_local_runner.stdout


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["slurm", *FLAGS, "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert f"==> {out / '02_train.sbatch'} <==" in printed and "#SBATCH --array=0-19" in printed
    assert "train: train 2 trainer(s) x 2 configuration(s) x 5 fold(s)" in printed


def test_writing_replaces_only_our_own_files(tmp_path):
    out = tmp_path / "jobs"
    out.mkdir()
    (out / "02_train.sbatch").write_text("#!/bin/bash\n# my own script\n")
    with pytest.raises(UserFacingError, match="was not written by nnunet-ext slurm"):
        slurm.write(slurm.generate(build_workflow(build_spec(PLAN)), out), out)
    assert (out / "02_train.sbatch").read_text() == "#!/bin/bash\n# my own script\n"
    (out / "02_train.sbatch").unlink()
    (out / "notes.txt").write_text("mine")
    slurm.write(slurm.generate(build_workflow(build_spec(PLAN)), out), out)
    assert (out / "05_submit.sbatch").is_file()
    # a plan without the submission step: our stale script goes, the user's file stays
    smaller = {k: v for k, v in PLAN.items() if not k.startswith("submit")}
    slurm.write(slurm.generate(build_workflow(build_spec(smaller)), out), out)
    assert not (out / "05_submit.sbatch").exists() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("plan, message", [
    ({"dataset": 17, "partition_gpus": "gpu"}, r"unknown key 'partition_gpus' in .*Did you mean 'partition_gpu'"),
    ({"trainers": ["nnUNetTrainer"]}, r"dataset is missing: give -d ID"),
    ({"dataset": 17, "folds": "all"}, r"'folds' in .*whole numbers"),
    ({"dataset": 17, "gpus_per_job": "two"}, r"'gpus_per_job' in .*whole number"),
    ({"dataset": 17, "configurations": ["3d_fulres"]}, r"unknown configuration '3d_fulres' \(did you mean '3d_fullres'"),
    ({"dataset": 17, "configurations": ["3d_cascade_fullres"]}, r"add 3d_lowres"),
    ({"dataset": 17, "gpus_per_job": 2, "device": "cpu"}, r"'gpus_per_job' in .*CUDA only"),
    ({"dataset": 17, "planner": "CoTrPlanner"}, r"'plans' in .*nnUNetPlans is not overwritten"),
    ({"dataset": 17, "predict_input": "x"}, r"'predict_output' in .*give both"),
    ({"dataset": 17, "submit_challenge": "kits21", "submit_output": "s"}, r"'submit_challenge' in .*predict_input"),
    ({"dataset": 17, "predict_input": "i", "predict_output": "o", "submit_challenge": "amos22",
      "submit_output": "s.zip"}, r"'submit_task' in .*\"1\" or \"2\""),
    ({"dataset": 17, "predict_input": "i", "predict_output": "o", "submit_challenge": "amos22", "submit_task": "1",
      "submit_output": "submission"}, r"'submit_output' in .*ending in .zip"),
    ({"dataset": 17, "time_train": "2 days"}, r"'time_train' in .*HH:MM:SS"),
    ({"dataset": 17, "mem": "lots"}, r"'mem' in .*64G"),
    ({"dataset": 17, "npz": False, "ensembling": True}, r"'ensembling' in .*npz"),
    ({"dataset": 17, "sbatch_extra": ["qos=long"]}, r"'sbatch_extra' in .*--qos=long"),
])
def test_bad_plans_name_the_key_and_the_fix(tmp_path, capsys, plan, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert main(["slurm", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert str(path) in error or "dataset is missing" in error


def test_no_npz_flag_also_disables_ensembling(tmp_path):
    jobs = generated(tmp_path, "--no-npz")
    assert "--npz" not in jobs["02_train.sbatch"] and "--disable_ensembling" in jobs["03_find_best.sbatch"]


def test_unreadable_plan_files(tmp_path, capsys):
    broken = tmp_path / "plan.json"
    broken.write_text('{"dataset": 17,}')
    assert main(["slurm", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    yaml_plan = tmp_path / "plan.yaml"
    yaml_plan.write_text("dataset: 17\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        assert main(["slurm", str(yaml_plan), "--dry-run"]) == 2
        error = capsys.readouterr().err
        assert "needs PyYAML" in error and json.dumps(EXAMPLE_PLAN, indent=2)[:40] in error
    else:
        assert main(["slurm", str(yaml_plan), "--dry-run"]) == 0


def test_example_plan_in_the_errors_is_valid():
    build_workflow(build_spec(EXAMPLE_PLAN), environ={})


def test_predict_step_runs_what_find_best_chose():
    def info(*members):
        return {"folds": [0, 1], "dataset_name_or_id": "Dataset017_X",
                "best_model_or_ensemble": {"postprocessing_file": "/r/pp.pkl", "some_plans_file": "/r/plans.json",
                                           "selected_model_or_models": [
                                               {"trainer": t, "configuration": c, "plans_identifier": "nnUNetPlans"}
                                               for t, c in members]}}
    single = inference_commands(info(("BANetTrainer", "3d_fullres")), "/in", "/out", Path("/nonexistent"), "cpu", 2)
    assert single[0][:3] == ["nnUNetv2_predict", "-d", "Dataset017_X"] and "--save_probabilities" not in single[0]
    assert single[0][single[0].index("-f") + 1:single[0].index("-tr")] == ["0", "1"]
    assert single[1][:5] == ["nnUNetv2_apply_postprocessing", "-i", single[0][single[0].index("-o") + 1], "-o", "/out"]
    ensemble = inference_commands(info(("A", "3d_fullres"), ("B", "3d_lowres")), "/in", "/out", Path("/x"))
    assert [c[0] for c in ensemble] == ["nnUNetv2_predict", "nnUNetv2_predict", "nnUNetv2_ensemble",
                                        "nnUNetv2_apply_postprocessing"]
    assert all("--save_probabilities" in c for c in ensemble[:2])
    members = [c[c.index("-o") + 1] for c in ensemble[:2]]
    assert ensemble[2][2:4] == members and all(m.startswith("/out_parts/") for m in members)


def test_predict_step_predicts_the_cascade_previous_stage_first(tmp_path):
    model = tmp_path / "A__nnUNetPlans__3d_cascade_fullres"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"configurations": {"3d_cascade_fullres": {"previous_stage": "3d_lowres"}}}))
    info = {"folds": [0], "dataset_name_or_id": 17,
            "best_model_or_ensemble": {"postprocessing_file": "p", "some_plans_file": "q", "selected_model_or_models": [
                {"trainer": "A", "configuration": "3d_cascade_fullres", "plans_identifier": "nnUNetPlans"}]}}
    lowres, cascade, _ = inference_commands(info, "/in", "/out", tmp_path)
    assert lowres[lowres.index("-c") + 1] == "3d_lowres"
    assert cascade[cascade.index("-prev_stage_predictions") + 1] == lowres[lowres.index("-o") + 1]


# --- helpers ---------------------------------------------------------------------------------------

def _bash(script: Path, env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env={**env, **extra}, capture_output=True, text=True, timeout=60)


def _use_stub_folders(jobs_dir: Path, env: dict) -> None:
    """Point common.sh at the stub environment's nnU-Net folders (the plan's are cluster paths) and
    drop the plan's module/venv set-up lines (that cluster's software does not exist here)."""
    common = jobs_dir / "common.sh"
    lines = [l for l in common.read_text().splitlines() if not l.startswith("export nnUNet_")]
    common.write_text("\n".join(lines) + "\n")
    setup = jobs_dir / "setup.sh"
    if setup.is_file():
        setup.write_text("\n".join(l for l in setup.read_text().splitlines()
                                   if not l.startswith(("module load", "source /opt"))) + "\n")
