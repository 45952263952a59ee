"""`python -m bench` (and `make bench`): every benchmark in turn; each prints its table and writes its JSON."""

import subprocess
import sys

BENCHMARKS = ["bench.engine", "bench.api", "bench.queue", "bench.memory", "bench.soak", "bench.quality"]  # bench.gpu needs CUDA

if __name__ == "__main__":
    failed = [name for name in BENCHMARKS if subprocess.run([sys.executable, "-m", name]).returncode != 0]
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
