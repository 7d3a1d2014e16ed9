"""Time to write the built-in synthetic dataset (default spec: 10 training + 2 test cases)."""
from __future__ import annotations

import json
import statistics
import tempfile
import time

from nnunet_ext.datasets import SyntheticSpec, write_synthetic_dataset

RUNS = 5


def main() -> None:
    seconds = []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            write_synthetic_dataset(folder, 13, spec=SyntheticSpec())
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"benchmark": "synthetic_dataset_write", "spec": SyntheticSpec().shape,
                      "median_s": round(statistics.median(seconds), 3), "runs": RUNS}))


if __name__ == "__main__":
    main()
