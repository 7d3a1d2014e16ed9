"""The order in which the default run hands test files to the pytest-xdist workers (xdist_schedule.py)."""
from __future__ import annotations

from collections import OrderedDict

from xdist.scheduler.loadscope import LoadScopeScheduling
from xdist_schedule import HeavyFilesFirst


def test_the_first_worker_takes_the_lightest_file_the_others_the_heaviest(monkeypatch):
    handed = []

    def hand_out(scheduler, node):  # xdist's own assignment: the first file of the queue
        handed.append((node, scheduler.workqueue.popitem(last=False)[0]))

    monkeypatch.setattr(LoadScopeScheduling, "_assign_work_unit", hand_out)
    scheduler = HeavyFilesFirst.__new__(HeavyFilesFirst)  # only the queue and the nodes matter here
    scheduler.assigned_work = {"gw0": {}, "gw1": {}, "gw2": {}}
    files = ["tests/test_unknown_a.py", "tests/test_demo.py", "tests/test_checkpoint_safety.py",
             "tests/test_slurm.py", "tests/test_universal.py", "tests/test_unknown_b.py"]
    scheduler.workqueue = OrderedDict((name, {f"{name}::test": False}) for name in files)
    for node in ["gw1", "gw0", "gw2", "gw0", "gw1", "gw0"]:
        scheduler._assign_work_unit(node)
    assert handed == [("gw1", "tests/test_checkpoint_safety.py"), ("gw0", "tests/test_unknown_b.py"),
                      ("gw2", "tests/test_universal.py"), ("gw0", "tests/test_unknown_a.py"),
                      ("gw1", "tests/test_demo.py"), ("gw0", "tests/test_slurm.py")]
