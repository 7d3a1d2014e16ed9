"""Which test file each pytest-xdist worker runs next: heavy files on all workers but one, light ones there.

``--dist loadfile`` hands out whole files (a file's module-scoped trained models stay on one worker)
in order of test count, so the few-test files that run stock nnU-Net commands for a minute come
last, and one core idles while the other finishes them. Here the files are ordered by their
expected seconds (``EXPECTED_SECONDS``, measured on a 2-core machine). The first worker takes the
lightest file left and every other worker the heaviest, so the heavy files start early, the two
ends meet in the middle of the list and the run ends on files of a few seconds. Nothing but the
order changes; a file missing from the table counts as light.
"""
from __future__ import annotations

from pathlib import PurePosixPath

from xdist.scheduler import LoadFileScheduling

# wall seconds of each file in the default run (2 cores, 2 workers; a shared root's build counts in the file
# that happened to ask first); files of less than 4 s are left out
EXPECTED_SECONDS = {
    "test_checkpoint_safety.py": 115, "test_universal.py": 95, "test_end_to_end.py": 80, "test_cotr_trainer.py": 60,
    "test_banet.py": 50, "test_two_stream_loader.py": 40, "test_demo.py": 35, "test_uniseg_trainer.py": 35,
    "test_cli.py": 30, "test_ddp.py": 30, "test_packaging.py": 30, "test_predict_parity.py": 20,
    "test_discovery.py": 17, "test_hostile_unlabeled.py": 17, "test_docs.py": 15, "test_base_trainer.py": 14,
    "test_synthetic_dataset.py": 12, "test_slurm_injection.py": 10, "test_import_weights.py": 9,
    "test_image_io.py": 8, "test_slurm.py": 8, "test_hostile_merge_predict.py": 8, "test_merge.py": 7,
    "test_unlabeled_preprocess.py": 7, "test_challenges_container.py": 6, "test_hostile_challenges.py": 6,
    "test_class_sam_trainer.py": 6, "test_static_checks.py": 6, "test_benchmark_suite.py": 6, "test_compile.py": 5,
    "test_predict_all_tasks.py": 4, "test_conventions.py": 4, "test_challenges_kits21.py": 4,
}
LIGHT_FILE_SECONDS = 1


def expected_seconds(scope: str) -> float:
    return EXPECTED_SECONDS.get(PurePosixPath(scope).name, LIGHT_FILE_SECONDS)


class HeavyFilesFirst(LoadFileScheduling):
    """``--dist loadfile`` with the order above; the first worker works from the light end."""

    def _assign_work_unit(self, node) -> None:  # noqa: ANN001 - xdist's WorkerController
        if not getattr(self, "_ordered", False):  # the queue is complete at the first assignment
            for scope in sorted(self.workqueue, key=expected_seconds, reverse=True):
                self.workqueue.move_to_end(scope)
            self._ordered = True
        if len(self.nodes) > 1 and node is self.nodes[0]:
            self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)  # the lightest next
        super()._assign_work_unit(node)
