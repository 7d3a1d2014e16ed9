"""Converter throughput: KiTS21 cases per second with -np 1 and -np 2 on a synthetic replica, in one run.

A case costs a header read per file, a full read of the label (the label-value check) and a copy of
every file, so the numbers depend on disk and CPU; compare the two only within one run. The replica
is written once; each setting converts it into a fresh nnU-Net raw folder.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from nnunet_ext.challenges import kits21
from nnunet_ext.challenges.common import run_conversion
from nnunet_ext.challenges.replicas import write_kits21_replica

CASES = 16
SHAPE = (96, 256, 256)  # (z, y, x): a small CT, big enough that decompression and copying dominate
REPEATS = 3  # each setting converts into a fresh folder this many times; the median is reported


def _throughput(release: Path, raw: Path, processes: int) -> float:
    plan = kits21.plan(release)
    start = time.perf_counter()
    summary = run_conversion(plan, raw, 900, "Bench", num_processes=processes, log=lambda line: None)
    seconds = time.perf_counter() - start
    assert summary.count("converted") == CASES, summary.format()
    return CASES / seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        release = write_kits21_replica(Path(folder) / "release", num_labelled=CASES, num_test=0, shape=SHAPE)
        rates = {n: statistics.median(_throughput(release, Path(folder) / f"raw_np{n}_{r}", n) for r in range(REPEATS))
                 for n in (1, 2)}
    print(json.dumps({"benchmark": "converter_throughput", "challenge": "kits21", "cases": CASES, "shape": SHAPE,
                      "repeats": REPEATS, "cases_per_s_np1": round(rates[1], 2), "cases_per_s_np2": round(rates[2], 2),
                      "speedup_np2": round(rates[2] / rates[1], 2)}))


if __name__ == "__main__":
    main()
