"""The local runner: the workflow's own scripts, in DAG order, without SLURM (stubs; and once for real)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster_stubs import DATASET_ID, fold_dir, stub_calls, stub_env
from nnunet_ext.cli.main import main
from nnunet_ext.cluster import slurm
from nnunet_ext.cluster.local import StepFailed, run_local
from nnunet_ext.cluster.spec import build_spec
from nnunet_ext.cluster.workflow import build_workflow

PLAN = {"dataset": DATASET_ID, "trainers": ["nnUNetExtTrainer", "BANetTrainer"], "folds": [0, 1],
        "device": "cpu", "num_processes": 1, "predict_input": "/in", "predict_output": "/out"}


def _setup(tmp_path, **plan):
    env = stub_env(tmp_path)
    workflow = build_workflow(build_spec({**PLAN, **plan}), environ=env)
    jobs = tmp_path / "jobs"
    slurm.write(slurm.generate(workflow, jobs), jobs)
    return workflow, jobs, env


def _run(workflow, jobs, env, **kwargs) -> str:
    lines: list[str] = []
    run_local(workflow, jobs, env=env, out=lines.append, **kwargs)
    return "".join(lines)


def test_runs_every_step_and_array_task_in_dag_order(tmp_path):
    workflow, jobs, env = _setup(tmp_path)
    output = _run(workflow, jobs, env)
    assert [c.split()[0] for c in stub_calls(env)] == ["nnUNetv2_plan_and_preprocess"] + ["nnUNetv2_train"] * 4 + \
        ["nnUNetv2_find_best_configuration", "python"]
    trained = [c.split()[1:6] for c in stub_calls(env) if c.startswith("nnUNetv2_train")]
    assert trained == [[str(DATASET_ID), "3d_fullres", str(f), "-tr", t]
                       for t in ("nnUNetExtTrainer", "BANetTrainer") for f in (0, 1)]
    assert all("-device cpu" in c for c in stub_calls(env) if c.startswith("nnUNetv2_train"))
    assert "=== nnunet-ext local: train task 3 (trainer BANetTrainer, configuration 3d_fullres, fold 1)" in output
    assert output.rstrip().endswith("all steps finished")
    assert (jobs / "logs" / "local_train_3.log").read_text().startswith("nnunet-ext: step train, task 3 of 4")


def test_a_rerun_skips_the_preprocessed_dataset_and_trained_folds(tmp_path):
    workflow, jobs, env = _setup(tmp_path)
    _run(workflow, jobs, env)
    Path(env["STUB_LOG"]).unlink()
    output = _run(workflow, jobs, env)
    assert [c.split()[0] for c in stub_calls(env)] == ["nnUNetv2_find_best_configuration", "python"]
    assert "step preprocess is done" in output and output.count("is trained and validated") == 4
    # a changed plan (other configurations) preprocesses again: the marker holds the step's commands
    workflow, jobs, env = _setup(tmp_path, configurations=["3d_fullres", "2d"])
    Path(env["STUB_LOG"]).unlink()
    _run(workflow, jobs, env)
    assert stub_calls(env)[0].startswith("nnUNetv2_plan_and_preprocess -d 17 -c 3d_fullres 2d")


def test_stops_at_the_first_failure_naming_step_task_and_log(tmp_path):
    workflow, jobs, env = _setup(tmp_path)
    env["STUB_FAIL"] = "nnUNetv2_train:1"
    with pytest.raises(StepFailed) as failure:
        _run(workflow, jobs, env)
    message = str(failure.value)
    assert "step train task 1 (trainer nnUNetExtTrainer, configuration 3d_fullres, fold 1) failed with exit " \
           "status 3" in message
    assert str(jobs / "logs" / "local_train_1.log") in message and "run the same command again" in message
    assert "stub training of fold 1 fails" in (jobs / "logs" / "local_train_1.log").read_text()
    assert [c.split()[0] for c in stub_calls(env)] == ["nnUNetv2_plan_and_preprocess", "nnUNetv2_train",
                                                       "nnUNetv2_train"]  # nothing after the failure
    # fixed: the rerun skips preprocessing and fold 0, trains from fold 1 on
    del env["STUB_FAIL"]
    Path(env["STUB_LOG"]).unlink()
    _run(workflow, jobs, env)
    assert [c.split()[3] for c in stub_calls(env) if c.startswith("nnUNetv2_train")] == ["1", "0", "1"]
    assert fold_dir(env, "BANetTrainer", "3d_fullres", 1).is_dir()


def test_from_starts_at_a_later_step(tmp_path):
    workflow, jobs, env = _setup(tmp_path)
    _run(workflow, jobs, env, from_step="find_best")
    assert [c.split()[0] for c in stub_calls(env)] == ["nnUNetv2_find_best_configuration", "python"]
    with pytest.raises(ValueError, match="no step 'trian'; the steps are preprocess, train, find_best, predict"):
        _run(workflow, jobs, env, from_step="trian")


def test_cli_local_exit_status_and_message(tmp_path, monkeypatch, capsys):
    env = stub_env(tmp_path, STUB_FAIL="nnUNetv2_find_best_configuration")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    assert main(["slurm", str(plan), "--out", str(tmp_path / "jobs"), "--local"]) == 1
    captured = capsys.readouterr()
    assert "nnunet-ext slurm --local: step find_best failed with exit status 3" in captured.err
    assert main(["slurm", str(plan), "--out", str(tmp_path / "jobs"), "--from", "train"]) == 2
    assert "--from only applies to --local" in capsys.readouterr().err


@pytest.mark.slow
def test_the_workflow_end_to_end_on_the_harness_dataset(tmp_path):
    """plan+preprocess, train 1 fold (1 epoch x 2 iterations, CPU), find_best for that fold, predict: the stock
    commands through the generated scripts. About 2-4 minutes on a 2-core CPU."""
    import SimpleITK as sitk

    from nnunet_ext.testing.harness import make_nnunet_root

    root = make_nnunet_root(tmp_path / "root")
    env = root.env(epochs=1, iterations=2, nnUNet_npp="1", nnUNet_nps="1")
    predictions = tmp_path / "predictions"
    spec = build_spec({"dataset": root.dataset_id, "trainers": ["nnUNetExtTrainer"], "folds": [0], "device": "cpu",
                       "num_processes": 1, "predict_input": str(root.dataset_raw / "imagesTs"),
                       "predict_output": str(predictions)})
    workflow = build_workflow(spec, environ=env)
    jobs = tmp_path / "jobs"
    slurm.write(slurm.generate(workflow, jobs), jobs)
    output = _run(workflow, jobs, env)
    fold = root.results / root.dataset_name / "nnUNetExtTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and list((fold / "validation").glob("*.npz"))
    info = json.loads((root.results / root.dataset_name / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == "nnUNetExtTrainer"
    references = sorted(p.name for p in (root.dataset_raw / "labelsTs").glob("*.nii.gz"))
    assert sorted(p.name for p in predictions.iterdir()) == references
    image = sitk.ReadImage(str(predictions / references[0]))
    assert image.GetSize() == sitk.ReadImage(str(root.dataset_raw / "labelsTs" / references[0])).GetSize()
    assert "num_epochs = 1 (was 1000)" in output
    # run again: nothing is preprocessed or trained twice
    again = _run(workflow, jobs, env, from_step=None)
    assert "step preprocess is done" in again and "is trained and validated" in again
