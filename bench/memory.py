"""Peak worker memory when the training data is larger than the memory budget.

Writes a safetensors data file of --gb GB (x float32 [N, F], y int64; Gaussian class blobs) to a temp
folder, then trains on it in a fresh subprocess per run, the way a worker would:
  supervised     the student alone
  kd             `kd` with a small teacher (a nearest-centre linear classifier); teacher logits in memory
  kd, mapped     the same with the teacher logits forced onto disk and memory-mapped
                 (what happens when the logits themselves outgrow LOGITS_MEMORY_LIMIT)
One epoch each. The engine memory-maps safetensors files above its data budget (1 GiB), so the data is
read a batch at a time and the map's pages are dropped as it goes.

Peak RSS is the child's own VmHWM (read from /proc/self/status as it finishes), cross-checked against
the parent sampling /proc/<pid>/status every 50 ms (anonymous and file-backed pages apart) and
getrusage(RUSAGE_CHILDREN).ru_maxrss. Target: every peak < 1.5 GB. The folder is deleted at the end;
the script refuses to start with less than 10 GB free there.

    python -m bench.memory [--gb 4] [--features 1000] [--dir /tmp] [--json]

Writes docs/bench/memory.json.
"""

import argparse
import hashlib
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench" / "memory.json"
TARGET_BYTES = 1.5e9
MIN_FREE_BYTES = 10e9
CLASSES = 10
GEN_ROWS = 16384  # rows generated and written per chunk (64 MB at 1000 features)
RUNS = {
    "supervised": {"method": {"type": "supervised"}, "teacher": False, "map_logits": False},
    "kd": {"method": {"type": "kd", "temperature": 4.0, "alpha": 0.5}, "teacher": True, "map_logits": False},
    "kd, mapped logits": {"method": {"type": "kd", "temperature": 4.0, "alpha": 0.5}, "teacher": True,
                          "map_logits": True},
}  # fmt: skip


# --------------------------------------------------------------------------- data


def write_data(path: Path, rows: int, features: int, seed: int = 0) -> np.ndarray:
    """Stream a safetensors file {x: float32 [rows, features], y: int64 [rows]}; returns the class centres.

    Written chunk by chunk (the generator never holds the data); the header is the format's
    8-byte length + JSON, padded with spaces to a multiple of 8.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 0.06, size=(CLASSES, features)).astype(np.float32)
    x_bytes, y_bytes = rows * features * 4, rows * 8
    header = json.dumps({
        "x": {"dtype": "F32", "shape": [rows, features], "data_offsets": [0, x_bytes]},
        "y": {"dtype": "I64", "shape": [rows], "data_offsets": [x_bytes, x_bytes + y_bytes]},
    }, separators=(",", ":")).encode()  # fmt: skip
    header += b" " * (-len(header) % 8)
    labels = rng.integers(0, CLASSES, size=rows).astype("<i8")
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for start in range(0, rows, GEN_ROWS):
            y = labels[start : start + GEN_ROWS]
            x = rng.standard_normal((len(y), features), dtype=np.float32)
            x += centres[y]
            f.write(x.astype("<f4", copy=False).data)
        f.write(labels.data)
    return centres


def write_teacher(path: Path, centres: np.ndarray) -> dict:
    """A linear teacher z = W·x + b with W = centres, b = −|c|²/2: the nearest-centre rule for the blobs."""
    import torch

    from worker.engine import build_model
    from worker.engine.weights import save_model

    arch = {"name": "mlp", "config": {"hidden_sizes": []}}
    model = build_model(arch, (centres.shape[1],), CLASSES)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(centres))
        model.head.bias.copy_(torch.from_numpy(-0.5 * (centres**2).sum(1)))
    save_model(model, path, {"architecture": arch})
    return arch


# --------------------------------------------------------------------------- one run (child process)


def child(config: dict) -> None:
    """Runs in the subprocess: one training run, then its own peak RSS as one JSON line."""
    from worker.engine import RunInputs, TeacherInput, configure_threads, run_distillation, teacher_cache
    from worker.engine.callbacks import Callback

    threads = configure_threads(config["threads"])
    if config["map_logits"]:
        teacher_cache.LOGITS_MEMORY_LIMIT = 0
    events = {}

    class Events(Callback):
        def on_log(self, state, level, message, data):
            events.setdefault(message, data)

    teachers = []
    if config["teacher"]:
        t = config["teacher_input"]
        teachers = [
            TeacherInput(architecture=t["architecture"], weights_path=Path(t["path"]), sha256=t["sha256"])
        ]
    spec = {
        "teachers": [{} for _ in teachers],
        "student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [32]}}},
        "method": config["method"],
        "hyperparameters": {"epochs": 1, "batch_size": config["batch_size"], "learning_rate": 3e-3,
                            "seed": 0, "validation_fraction": 0.05},
    }  # fmt: skip
    started = time.perf_counter()
    result = run_distillation(
        RunInputs(job_id=config["name"], spec=spec, teachers=teachers, train_data=config["data"],
                  validation_data=None, output_dir=Path(config["out"]), cache_dir=Path(config["cache"])),
        [Events()],
    )  # fmt: skip
    wall = time.perf_counter() - started
    history = json.loads(result.artifacts["metrics.json"].read_text())["history"]
    print(json.dumps({
        "status": result.status,
        "wall_seconds": wall,
        "phases": result.summary["phases"],
        "epoch_seconds": history[-1]["seconds"],
        "n_train": result.summary["n_train"],
        "n_val": result.summary["n_val"],
        "val_accuracy": result.summary["val_accuracy"],
        "teacher_accuracy": result.summary["teacher_accuracy"],
        "storage": (events.get("data loaded") or {}).get("storage"),
        "teacher_logits": (events.get("teacher cache built") or events.get("teacher cache hit") or {}).get("storage"),
        "threads": threads,
        "self": proc_status("self"),
    }))  # fmt: skip


# --------------------------------------------------------------------------- measuring (parent)


def proc_status(pid) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process, in bytes ({} once it has gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(name: str, index: int, config: dict, workdir: Path) -> dict:
    config = {**config, "name": f"bench-memory-{index}", "out": str(workdir / f"out-{index}"),
              "cache": str(workdir / f"cache-{index}")}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bench.memory", "--child", json.dumps(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in proc_status(proc.pid).items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"run {name!r} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    report["name"] = name
    report["peak_rss_bytes"] = report["self"]["VmHWM"]
    report["sampled_peak_bytes"] = peaks
    report["ru_maxrss_children_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return report


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=4.0, help="size of the generated x array (GB, 1e9 bytes)")
    parser.add_argument("--features", type=int, default=1000, help="F: x is float32 [N, F]")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the runs (default: the cores this process may use)")  # fmt: skip
    parser.add_argument(
        "--dir", default=None, help="folder for the temp data (default: the system temp folder)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    base = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if free < MIN_FREE_BYTES:
        print(f"bench.memory needs at least {gb(MIN_FREE_BYTES)} free in {base} for the generated data "
              f"(the data file, teacher-logit files and run outputs); only {gb(free)} is free there. "
              "Free some space or point --dir at a roomier disk.", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    rows = math.ceil(args.gb * 1e9 / (4 * args.features))
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=base))
    try:
        data = workdir / "data.safetensors"
        started = time.perf_counter()
        centres = write_data(data, rows, args.features)
        gen_seconds = time.perf_counter() - started
        file_bytes = data.stat().st_size
        print(f"generated {data.name}: x float32 [{rows}, {args.features}], y int64; {gb(file_bytes)} "
              f"in {gen_seconds:.0f} s", flush=True)  # fmt: skip
        teacher_path = workdir / "teacher.safetensors"
        arch = write_teacher(teacher_path, centres)
        teacher = {"architecture": arch, "path": str(teacher_path),
                   "sha256": hashlib.sha256(teacher_path.read_bytes()).hexdigest()}  # fmt: skip
        results = []
        for name, run in RUNS.items():
            config = {**run, "data": str(data), "teacher_input": teacher, "batch_size": args.batch_size,
                      "threads": args.threads}  # fmt: skip
            results.append(measure(name, len(results), config, workdir))
            r = results[-1]
            print(f"  {name}: peak {gb(r['peak_rss_bytes'])}, {r['wall_seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'run':<19}{'peak RSS':>10}{'anon':>9}{'file':>9}{'storage':>9}{'logits':>8}{'wall':>7}"
          f"{'epoch':>7}{'rows/s':>9}{'val acc':>9}")  # fmt: skip
    for r in results:
        s = r["sampled_peak_bytes"]
        print(f"{r['name']:<19}{gb(r['peak_rss_bytes']):>10}{s['RssAnon'] / 1e9:>8.2f}G{s['RssFile'] / 1e9:>8.2f}G"
              f"{r['storage'] or '-':>9}{r['teacher_logits'] or '-':>8}{r['wall_seconds']:>6.0f}s"
              f"{r['epoch_seconds']:>6.0f}s{r['n_train'] / r['epoch_seconds']:>9.0f}"
              f"{r['val_accuracy']:>9.3f}")  # fmt: skip
    peak = max(r["peak_rss_bytes"] for r in results)
    met = peak < TARGET_BYTES
    print(f"\ndata file {gb(file_bytes)}; highest peak RSS {gb(peak)}: target < {gb(TARGET_BYTES)} "
          f"{'met' if met else 'NOT met'}")  # fmt: skip
    import torch

    report = {
        "peak_rss_bytes": peak,
        "target_bytes": TARGET_BYTES,
        "target_met": met,
        "data_file_bytes": file_bytes,
        "rows": rows,
        "features": args.features,
        "batch_size": args.batch_size,
        "threads": results[0]["threads"],
        "generate_seconds": gen_seconds,
        "torch": torch.__version__,
        "runs": results,
        "note": "peak_rss_bytes is the child's VmHWM (anonymous + file-backed pages); the data file was just "
        "written, so it was in the page cache. Each run: one epoch, the student an MLP [32], validation = "
        "5% of the rows split off by index.",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps({"peak_rss_bytes": peak, "target_met": met, "data_file_bytes": file_bytes}))


if __name__ == "__main__":
    main()
