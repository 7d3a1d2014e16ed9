"""Generated job scripts cannot be injected (issue 16, defect 2).

Hostile values go into every field that reaches a script (trainer, plans, planner, prediction and
submission folders, the jobs folder, nnU-Net's folders, exported variables, account, partitions,
gres, extra #SBATCH options); the scripts are then EXECUTED -- ``submit_all.sh`` with a stub
``sbatch`` that reads the #SBATCH lines as sbatch does, and every step, outside and inside a
"SLURM job" -- with stub commands on PATH. The injected command never runs (no file named PWNED
appears), and every stub receives the value as one intact argument. What a script cannot carry
(line breaks, NUL, control characters; #SBATCH values sbatch would split) is refused with a
one-line message and nothing is written.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_stubs import (DATASET_ID, DATASET_NAME, fold_dir, sbatch_arguments, sbatch_directives,
                           sbatch_submissions, stub_argv, stub_env, stub_env_values)
from nnunet_ext.cluster import slurm
from nnunet_ext.cluster.quoting import sbatch_word
from nnunet_ext.cluster.spec import build_spec
from nnunet_ext.cluster.workflow import build_workflow
from nnunet_ext.errors import UserFacingError
from nnunet_ext.testing.hostile import assert_refused, run_cli, snapshot, temporaries

PWNED = "PWNED"

# printable values that bash would run or expand if they were pasted unquoted or into "..."; the
# ones without whitespace, quotes, backslashes or '#' also go into the #SBATCH lines
HOSTILE = [
    'a"; touch PWNED; "',
    "$(touch PWNED)",
    "`touch PWNED`",
    "x; touch PWNED",
    "x && touch PWNED || touch PWNED",
    "x | tee PWNED",
    "x' ; touch PWNED ; '",
    "x > PWNED",
    "${IFS}touch${IFS}PWNED",
    "$(touch${IFS}PWNED)",
    "`touch${IFS}PWNED`",
    "x;touch${IFS}PWNED&&y|tee${IFS}PWNED>PWNED",
    "*",
    "[a-z]*?{a,b}",
    "#$(touch PWNED) # not a comment",
    "\\$(touch PWNED)\\",
    "~root $HOME !! $((1+1))",
    "é 中 — $(touch PWNED)",
    "100%j %x%%",
]
SBATCH_SPECIAL = set(" \t'\"\\#")


def _sbatch_safe(value: str) -> bool:
    return not SBATCH_SPECIAL & set(value)


def _plan(tmp: Path, value: str) -> dict:
    """Every free-text field of a plan set to ``value`` (the #SBATCH ones where sbatch can read it)."""
    plan = {"dataset": DATASET_ID, "trainers": [value], "plans": value, "planner": value, "folds": [0],
            "device": "cuda", "num_processes": 1, "preprocess_unlabeled": True,
            "predict_input": str(tmp / f"in {value}"), "predict_output": str(tmp / f"out {value}"),
            "submit_challenge": "kits21", "submit_output": str(tmp / f"submission {value}"),
            "environment": {"HOSTILE_VALUE": value}}
    if _sbatch_safe(value):
        plan.update(account=value, partition_cpu=value, partition_gpu=value, gres=value,
                    sbatch_extra=[f"--comment={value}"])
    return plan


def _flags(plan: dict) -> list[str]:
    """The same plan as command-line flags."""
    flags = ["-d", str(plan["dataset"]), "-tr", *plan["trainers"], "-p", plan["plans"], "-pl", plan["planner"],
             "-f", "0", "-device", plan["device"], "-np", "1", "--preprocess-unlabeled",
             "--predict-input", plan["predict_input"], "--predict-output", plan["predict_output"],
             "--submit-challenge", "kits21", "--submit-output", plan["submit_output"],
             "--env", f"HOSTILE_VALUE={plan['environment']['HOSTILE_VALUE']}"]
    if "account" in plan:
        flags += ["--account", plan["account"], "--partition", plan["partition_cpu"], "--gres", plan["gres"],
                  f"--sbatch-extra={plan['sbatch_extra'][0]}"]
    return flags


def _hostile_env(tmp: Path, value: str) -> dict:
    """Stubs on PATH; nnU-Net's folders (taken from the environment into the scripts) named with ``value``."""
    env = stub_env(tmp, STUB_SHOW_ENV="HOSTILE_VALUE", nnUNet_raw=str(tmp / f"raw {value}"),
                   nnUNet_preprocessed=str(tmp / f"preprocessed {value}"),
                   nnUNet_results=str(tmp / f"results {value}"))
    env.pop("HOSTILE_VALUE", None)  # only common.sh may set it
    Path(env["nnUNet_preprocessed"], DATASET_NAME).mkdir(parents=True)  # what the (stubbed) planner leaves
    return env


def _bash(script: Path, env: dict, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env={**env, **extra}, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def _files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_not_injected(tmp: Path) -> None:
    found = [p for p in tmp.rglob("*") if p.name == PWNED]
    assert not found, f"the injected command ran: {found}"


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """Scripts and the in-process CLI run in a folder of their own, where a relative PWNED would land."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_reach_every_command_as_one_argument_and_never_run(tmp_path, cwd, value):
    env = _hostile_env(tmp_path, value)
    plan = _plan(tmp_path, value)
    jobs = tmp_path / ("jobs" if "\\" in value else f"jobs {value}")  # sbatch: no backslash in --output
    # the same scripts from flags and from a plan file
    assert run_cli(["slurm", *_flags(plan), "--out", str(jobs)], env=env).returncode == 0
    from_flags = _files(jobs)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    outcome = run_cli(["slurm", str(plan_file), "--out", str(jobs)], env=env)
    assert outcome.returncode == 0, outcome.output
    assert _files(jobs) == from_flags

    # submit_all.sh with a stub sbatch that reads the #SBATCH lines as sbatch does
    submitted = _bash(jobs / "submit_all.sh", env, cwd)
    assert submitted.returncode == 0, submitted.stderr
    steps = ["01_preprocess", "02_train", "03_find_best", "04_predict", "05_submit"]
    submissions = sbatch_submissions(env)
    assert [s["script"] for s in submissions] == [str(jobs / f"{step}.sbatch") for step in steps]
    assert submissions[1]["argv"] == ["--parsable", "--dependency=afterok:1001", "--kill-on-invalid-dep=yes",
                                      str(jobs / "02_train.sbatch")]
    logs = str(jobs / "logs").replace("%", "%%")
    for submission, step in zip(submissions, steps):
        directives = submission["directives"]
        assert "<HETJOB SEPARATOR>" not in directives
        assert f"--job-name=nnx{DATASET_ID}-{step[3:]}" in directives
        log = "%x_%A_%a.out" if step == "02_train" else "%x_%j.out"
        assert f"--output={logs}/{log}" in directives, directives
        if _sbatch_safe(value):
            assert {f"--account={value}", f"--partition={value}", f"--comment={value}"} <= set(directives)
            if step in ("02_train", "04_predict"):
                assert f"--gres={value}:1" in directives
    assert f"Logs: {jobs / 'logs'}." in submitted.stdout

    # every step, outside SLURM; then the training task again inside a "SLURM job" (background + trap)
    for step in steps:
        result = _bash(jobs / f"{step}.sbatch", env, cwd, SLURM_ARRAY_TASK_ID="0")
        assert result.returncode == 0, (step, result.stdout, result.stderr)
    fold = fold_dir(env, value, "3d_fullres", 0, plans=value)
    assert (fold / "checkpoint_final.pth").is_file() and (jobs / "state" / "preprocess.done").is_file()
    (fold / "checkpoint_final.pth").unlink()  # trains again, now as a SLURM job would
    in_slurm = _bash(jobs / "02_train.sbatch", env, cwd, SLURM_JOB_ID="77", SLURM_ARRAY_TASK_ID="0")
    assert in_slurm.returncode == 0, in_slurm.stderr

    pin, pout, sout = plan["predict_input"], plan["predict_output"], plan["submit_output"]
    train = ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", value, "-p", value, "-num_gpus", "1",
             "-device", "cuda", "--npz"]
    assert stub_argv(env) == [
        ["nnunet-ext", "plan", "-d", str(DATASET_ID), "-pl", value, "-c", "3d_fullres", "-np", "1",
         "-overwrite_plans_name", value, "--verify_dataset_integrity"],
        ["nnunet-ext", "preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", value, "-np", "1"],
        train,
        ["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "3d_fullres", "-tr", value, "-p", value,
         "-f", "0", "-np", "1"],
        ["python", "-m", "nnunet_ext.cluster.predict_best", "-d", str(DATASET_ID), "-i", pin, "-o", pout,
         "-device", "cuda", "-np", "1"],
        ["nnunet-ext", "submit", "kits21", pout, sout, "--images", pin],
        train,
    ]
    assert stub_env_values(env) == [value] * 7  # the exported variable, intact in every job
    _assert_not_injected(tmp_path)


@pytest.mark.parametrize("value", ['a"; touch PWNED; "', "$(touch PWNED)", "`touch PWNED` *"])
def test_the_local_runner_with_hostile_values(tmp_path, cwd, value):
    env = _hostile_env(tmp_path, value)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({**_plan(tmp_path, value), "device": "cpu"}))
    jobs = tmp_path / f"jobs {value}"
    outcome = run_cli(["slurm", str(plan_file), "--out", str(jobs), "--local"], env=env)
    assert outcome.returncode == 0, outcome.output
    assert "all steps finished" in outcome.stdout
    calls = stub_argv(env)
    assert [c[0] for c in calls] == ["nnunet-ext", "nnunet-ext", "nnUNetv2_train", "nnUNetv2_find_best_configuration",
                                     "python", "nnunet-ext"]
    assert calls[2][4:8] == ["-tr", value, "-p", value]
    assert (jobs / "logs" / "local_train_0.log").is_file()
    _assert_not_injected(tmp_path)


def test_setup_lines_are_the_users_shell_run_inside_slurm_jobs_only(tmp_path, cwd):
    """Verbatim by design (module load, source venv); a tab is fine there; values they read stay intact.
    (They run before the plan's exports, so that the plan's environment wins over what a module sets.)"""
    value = "$(touch PWNED) `touch PWNED`"
    env = _hostile_env(tmp_path, value)
    plan = {**_plan(tmp_path, value), "setup": ['printf "setup sees: %s\\n" "$SETUP_INPUT"', "\tSETUP_TAB=1"]}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    jobs = tmp_path / "jobs"
    assert run_cli(["slurm", str(plan_file), "--out", str(jobs)], env=env).returncode == 0
    assert (jobs / "setup.sh").read_text().endswith('\nprintf "setup sees: %s\\n" "$SETUP_INPUT"\n\tSETUP_TAB=1\n')
    in_job = _bash(jobs / "03_find_best.sbatch", env, cwd, SLURM_JOB_ID="5", SETUP_INPUT=value)
    assert in_job.returncode == 0 and f"setup sees: {value}\n" in in_job.stdout, in_job.stderr
    local = _bash(jobs / "03_find_best.sbatch", env, cwd, SETUP_INPUT=value)
    assert local.returncode == 0 and "setup sees" not in local.stdout
    _assert_not_injected(tmp_path)


def test_a_setup_line_cannot_break_out_of_its_file(tmp_path, cwd):
    """A stray ``fi`` closes nothing of ours: it is a syntax error of setup.sh, inside SLURM jobs only."""
    env = _hostile_env(tmp_path, "x")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({**_plan(tmp_path, "x"), "setup": ["fi; touch PWNED; if true; then :"]}))
    jobs = tmp_path / "jobs"
    assert run_cli(["slurm", str(plan_file), "--out", str(jobs)], env=env).returncode == 0
    assert _bash(jobs / "03_find_best.sbatch", env, cwd).returncode == 0  # outside SLURM: not sourced
    in_job = _bash(jobs / "03_find_best.sbatch", env, cwd, SLURM_JOB_ID="5")
    assert in_job.returncode != 0 and "setup.sh" in in_job.stderr and "syntax error" in in_job.stderr
    assert [c[0] for c in stub_argv(env)] == ["nnUNetv2_find_best_configuration"]  # the job stopped there
    _assert_not_injected(tmp_path)


GOOD = {"dataset": DATASET_ID, "trainers": ["nnUNetTrainer"], "folds": [0], "device": "cpu", "num_processes": 1,
        "account": "proj", "partition_gpu": "gpu"}

# (plan keys, flags, environment, needles): each must be refused with one line, nothing written
REFUSED = {
    "trainer newline (flag)": ({}, ["-tr", "a\ntouch PWNED"], {}, ["-tr", "line break"]),
    "trainer carriage return (plan)": ({"trainers": ["a\rb"]}, [], {}, ["'trainers' in", "carriage return"]),
    "plans NUL (flag)": ({}, ["-p", "nnUNetPlans\0x"], {}, ["-p", "NUL"]),
    "plans line separator U+2028": ({"plans": "a\u2028touch PWNED"}, [], {}, ["'plans' in", "U+2028"]),
    "trainer bidi override": ({}, ["-tr", "nnUNetTrainer\u202e"], {}, ["-tr", "U+202E"]),
    "predict folder escape sequence": ({"predict_input": "/in", "predict_output": "/out\x1b[31m"}, [], {},
                                       ["'predict_output' in", "U+001B"]),
    "account newline (plan)": ({"account": "proj\n#SBATCH --qos=high"}, [], {}, ["'account' in", "line break"]),
    "account space (flag)": ({}, ["--account", "my project"], {}, ["--account", "a space", "sbatch"]),
    "partition '#' (plan)": ({"partition_gpu": "gpu#x"}, [], {}, ["'partition_gpu' in", "'#'", "comment"]),
    "gres quote (plan)": ({"gres": 'gpu"a100'}, [], {}, ["'gres' in", "quote"]),
    "account hetjob (plan)": ({"account": "myHetJob"}, [], {}, ["'account' in", "hetjob"]),
    "sbatch extra space (flag)": ({}, ["--sbatch-extra=--comment=a b"], {}, ["--sbatch-extra", "a space"]),
    "sbatch extra backslash (plan)": ({"sbatch_extra": ["--comment=a\\b"]}, [], {}, ["'sbatch_extra'", "backslash"]),
    "setup line break (plan)": ({"setup": ["module load x\rrm -rf ~"]}, [], {}, ["'setup' in", "line break",
                                                                                "one shell line per list entry"]),
    "setup NUL (flag)": ({}, ["--setup", "module load x\0"], {}, ["--setup", "NUL"]),
    "environment value newline (plan)": ({"environment": {"X": "a\nb"}}, [], {}, ["'environment' in", "(X)",
                                                                                 "line break"]),
    "environment value tab (flag)": ({}, ["--env", "X=a\tb"], {}, ["--env", "(X)", "tab"]),
    "environment name (flag)": ({}, ["--env", "A;touch PWNED=1"], {}, ["--env", "not a variable name"]),
    "nnUNet_raw from the environment": ({}, [], {"nnUNet_raw": "/data/raw\ntouch PWNED"},
                                        ["nnUNet_raw", "line break"]),
    "jobs folder newline": ({}, ["--out", "jobs\n$(touch PWNED)"], {}, ["--out", "line break"]),
    "jobs folder backslash": ({}, ["--out", "jobs\\x"], {}, ["--out", "backslash"]),
    "jobs folder hetjob": ({}, ["--out", "my packjob folder"], {}, ["--out", "packjob"]),
    "dataset": ({}, ["-d", "17; touch PWNED"], {}, ["-d", "dataset id"]),
    "configuration": ({}, ["-c", "3d_fullres;touch PWNED"], {}, ["-c", "unknown configuration"]),
    "folds (plan)": ({"folds": ["0; touch PWNED"]}, [], {}, ["'folds' in", "whole numbers"]),
    "job prefix (flag)": ({}, ["--job-prefix", "a;touch${IFS}PWNED"], {}, ["--job-prefix", "letters"]),
    "time limit newline (flag)": ({}, ["--time-train", "48:00:00\n"], {}, ["--time-train", "line break"]),
    "dataset name with hetjob": ({"dataset": "Dataset017_hetjob"}, [], {}, ["'dataset' in", "hetjob"]),
}


@pytest.mark.parametrize("plan_keys, flags, environment, needles", REFUSED.values(), ids=REFUSED.keys())
def test_values_a_script_cannot_carry_are_refused_before_anything_is_written(tmp_path, cwd, plan_keys, flags,
                                                                            environment, needles):
    env = stub_env(tmp_path)
    good, hostile = tmp_path / "good.json", tmp_path / "hostile.json"
    good.write_text(json.dumps(GOOD))
    hostile.write_text(json.dumps({**GOOD, **plan_keys}))
    jobs = tmp_path / "jobs"
    assert run_cli(["slurm", str(good), "--out", str(jobs)], env=env).returncode == 0  # the previous generation
    before = snapshot(hostile, jobs)
    outcome = run_cli(["slurm", str(hostile), "--out", str(jobs), *flags], env={**env, **environment})
    assert_refused(outcome, needles, before=before, after=snapshot(hostile, jobs), clean=[jobs, tmp_path],
                   absent=[cwd / flags[-1]] if "--out" in flags else [])
    assert outcome.returncode == 2 and len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr
    assert outcome.stderr.startswith("nnunet-ext slurm: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".jobs.lock", "cwd", "good.json", "hostile.json", "jobs",
                                                          "stub_bin"]
    assert list(cwd.iterdir()) == []
    _assert_not_injected(tmp_path)


@pytest.mark.parametrize("value", [*HOSTILE, "a b", 'say "hi"', "it's", "a#b", "back\\slash", "\\", "%j%%"])
def test_sbatch_reads_back_each_quoted_value_as_written(value):
    """``sbatch_word`` against a port of sbatch's own #SBATCH grammar (cluster_stubs.sbatch_arguments)."""
    assert sbatch_arguments(" --output=" + sbatch_word("--out", value) + "  # a comment") == [f"--output={value}"]
    assert sbatch_directives(f"#!/bin/bash\n#SBATCH --output={sbatch_word('--out', value)}\necho hi\n#SBATCH --x") \
        == [f"--output={value}"]


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b", "a\tb", "my-HETJOB", "packjob"])
def test_sbatch_word_refuses_what_no_quoting_can_carry(value):
    with pytest.raises(UserFacingError, match="^--out: "):
        sbatch_word("--out", value)


def _generation(tmp_path: Path, trainers: list[str]) -> list[slurm.GeneratedFile]:
    spec = build_spec({**GOOD, "trainers": trainers, "setup": ["module load x"]})
    return slurm.generate(build_workflow(spec, environ=stub_env(tmp_path)), tmp_path / "jobs")


def test_ctrl_c_while_writing_leaves_the_previous_generation(tmp_path, cwd, monkeypatch):
    jobs = tmp_path / "jobs"
    slurm.write(_generation(tmp_path, ["nnUNetTrainer"]), jobs)
    before = snapshot(jobs)
    real, calls = slurm.atomic_open, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(slurm, "atomic_open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slurm.write(_generation(tmp_path, ["BANetTrainer", "nnUNetTrainer"]), jobs)
    assert snapshot(jobs) == before and temporaries(jobs) == []


def test_ctrl_c_during_the_renames_takes_effect_after_the_last_one(tmp_path, cwd, monkeypatch):
    jobs = tmp_path / "jobs"
    slurm.write(_generation(tmp_path, ["nnUNetTrainer"]), jobs)
    new = _generation(tmp_path, ["BANetTrainer", "nnUNetTrainer"])
    real_replace, renamed = os.replace, []
    # Ctrl-C as in a terminal: a process started in the background by a non-interactive shell inherits
    # an ignored SIGINT, and Python then keeps it ignored
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)

    def replace(source, target):
        if not renamed:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives at the first rename (in this thread)
        renamed.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with pytest.raises(KeyboardInterrupt):
            slurm.write(new, jobs)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    monkeypatch.undo()
    assert renamed[-1] == "submit_all.sh" and len(renamed) == len(new)
    assert {g.name: g.text for g in new} == {name: text for name, text in _files(jobs).items()}
    assert temporaries(jobs) == []


def test_scripts_follow_the_umask_and_a_replaced_script_keeps_its_mode(tmp_path, cwd):
    previous = os.umask(0o027)
    try:
        jobs = tmp_path / "jobs"
        slurm.write(_generation(tmp_path, ["nnUNetTrainer"]), jobs)
        assert stat.S_IMODE((jobs / "submit_all.sh").stat().st_mode) == 0o750
        assert stat.S_IMODE((jobs / "02_train.sbatch").stat().st_mode) == 0o750
        assert stat.S_IMODE((jobs / "common.sh").stat().st_mode) == 0o640
        (jobs / "submit_all.sh").chmod(0o700)
        slurm.write(_generation(tmp_path, ["BANetTrainer"]), jobs)
        assert stat.S_IMODE((jobs / "submit_all.sh").stat().st_mode) == 0o700
        assert "BANetTrainer" in (jobs / "02_train.sbatch").read_text()
    finally:
        os.umask(previous)


def test_a_second_run_on_the_same_jobs_folder_is_refused_while_the_first_holds_it(tmp_path, cwd, monkeypatch):
    from nnunet_ext import atomic_io

    env = stub_env(tmp_path)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    jobs = tmp_path / "jobs"
    assert run_cli(["slurm", str(good), "--out", str(jobs)], env=env).returncode == 0
    before = snapshot(jobs)
    # another process holds the folder (as a running `nnunet-ext slurm --local` would)
    hold = ("import sys, time\nfrom nnunet_ext.atomic_io import exclusive\n"
            "with exclusive(sys.argv[1], 'test'):\n    print('held', flush=True)\n    time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(jobs)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(atomic_io, "exclusive", functools.partial(atomic_io.exclusive, timeout=0.3))
        other = {**GOOD, "trainers": ["BANetTrainer"]}
        good.write_text(json.dumps(other))
        outcome = run_cli(["slurm", str(good), "--out", str(jobs)], env=env)
    finally:
        holder.kill()
        holder.wait()
    assert_refused(outcome, ["is in use by another", "nothing was written"], before=before, after=snapshot(jobs))
    assert "waiting up to" in outcome.stderr
