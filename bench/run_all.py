"""Run every benchmark in bench/ and print their markdown tables (what the README shows).

    make bench            # or: .venv/bin/python bench/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# --quick: the fewest rounds that still give a median (bench_probes: no nginx pairs, which take minutes).
QUICK = {"bench_syscalls.py": ["--rounds", "3"], "bench_probes.py": ["--rounds", "3", "--pairs", "0"]}
BENCHES = ["bench_syscalls.py", "bench_probes.py", "profile_nginx.py", "bench_window.py", "bench_inference.py", "bench_debounce.py",
           "bench_xdp.py"]


def main() -> int:
    quick = "--quick" in sys.argv
    status = 0
    for name in BENCHES:
        script = HERE / name
        if not script.exists():
            continue
        args = [sys.executable, str(script)] + (QUICK.get(name, []) if quick else [])
        print(f"\n## {name}\n", flush=True)
        status |= subprocess.run(args).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
