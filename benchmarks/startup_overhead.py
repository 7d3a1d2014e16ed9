"""Cost of the start-up hook (nnunet_ext.pth) on every Python start.

Measures, in one run on this machine:
  * ``python -X importtime -c pass``: the cumulative import time of ``nnunet_ext._startup`` (what
    the .pth line adds), median over N runs;
  * for context, the wall time of ``python -c pass`` and ``python -S -c pass`` (no site at all;
    the difference is all .pth files and site-packages, including setuptools' editable finder,
    which is not ours and absent in a regular install). Wall time is too noisy to resolve 1 ms,
    so the import time is the number we report.
Prints one JSON line. Requirement: < 10 ms added, no torch/nnunetv2 import.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

RUNS = 30


def hook_import_microseconds() -> int:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                            check=True)
    for line in result.stderr.splitlines():
        # "import time:   self [us] | cumulative | imported package"; cumulative includes nnunet_ext/__init__
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "nnunet_ext._startup":
            return int(parts[1])
    raise RuntimeError("nnunet_ext._startup was not imported at start-up: is nnunet-ext installed (the .pth)?")


def wall_seconds(arguments: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], check=True)
    return time.perf_counter() - start


def main() -> None:
    imports = [hook_import_microseconds() for _ in range(RUNS)]
    modules = subprocess.run([sys.executable, "-c", "import sys; print(sorted(m for m in sys.modules if "
                              "m.split('.')[0] in ('torch', 'nnunetv2', 'numpy')))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with_site = statistics.median(wall_seconds(["-c", "pass"]) for _ in range(RUNS))
    without_site = statistics.median(wall_seconds(["-S", "-c", "pass"]) for _ in range(RUNS))
    print(json.dumps({
        "benchmark": "startup_overhead",
        "hook_import_ms_median": statistics.median(imports) / 1000,
        "hook_import_ms_max": max(imports) / 1000,
        "python_c_pass_ms_median": round(with_site * 1000, 2),
        "python_S_c_pass_ms_median": round(without_site * 1000, 2),
        "heavy_modules_imported_at_startup": modules,
        "runs": RUNS,
    }))


if __name__ == "__main__":
    main()
