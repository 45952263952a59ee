"""Engine speed: a KD epoch against the student-only epoch and against the chapter's plain loop.

Per-epoch wall time, measured in one process with interleaved repeats (medians), of
  (a) student-only      the engine's `supervised` run of the student
  (b) seed loop         the reference chapter's loop: DataLoader, every teacher forward on every step,
                        with autograd recording (no no_grad), as written in ../shared/reference
  (c) engine kd         the engine's `kd` (teacher logits computed once and reused every epoch)
  (d) engine multi      the engine's `multi_teacher` with 3 teachers of different architectures
on MNIST-1D (16k training rows, cnn1d teacher → small MLP) and on synthetic 32×32 images
(resnet_cifar teacher → smaller resnet_cifar). Also the final validation accuracy of (b) and (c).

    python -m bench.engine [--repeats 3] [--epochs 3] [--json]

The last line with --json is one JSON object; the full result goes to docs/bench/engine.json.
"""

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from worker.engine import (
    RunInputs, TeacherInput, build_model, count_parameters, kernels, load_dataset, run_distillation,
)  # fmt: skip

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "engine.json"


def hyperparameters(epochs: int, batch_size: int) -> dict:
    # A constant rate, as in the chapter's loop (Adam at 3e-3 throughout), so final accuracies are comparable.
    return {"epochs": epochs, "batch_size": batch_size, "learning_rate": 3e-3, "optimizer": "adam",
            "weight_decay": 0.0, "momentum": 0.9, "scheduler": "constant", "seed": 0,
            "validation_fraction": 0.1, "baseline": False, "max_grad_norm": None}  # fmt: skip


def engine_run(workdir: Path, name: str, data: str, val: str, student: dict, method: dict, teachers, epochs: int,
               batch_size: int):  # fmt: skip
    spec = {"teachers": [{} for _ in teachers], "student": {"architecture": student}, "method": method,
            "hyperparameters": hyperparameters(epochs, batch_size)}  # fmt: skip
    inputs = RunInputs(job_id=name, spec=spec, teachers=teachers, train_data=data, validation_data=val,
                       output_dir=workdir / name, cache_dir=None)  # fmt: skip
    return run_distillation(inputs, [])


def epoch_seconds(result) -> float:
    """Median epoch time of a run (the training epochs; the one-time teacher pass is reported apart)."""
    history = json.loads(result.artifacts["metrics.json"].read_text())["history"]
    return statistics.median(row["seconds"] for row in history if row.get("phase", "train") == "train")


def train_teacher(workdir: Path, name: str, data: str, val: str, arch: dict, epochs: int, batch_size: int):
    result = engine_run(workdir, name, data, val, arch, {"type": "supervised"}, [], epochs, batch_size)
    path = result.artifacts["model.safetensors"]
    return TeacherInput(architecture=arch, weights_path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest()), \
        result.summary["val_accuracy"]  # fmt: skip


def seed_loop(x, y, xv, yv, teacher: nn.Module, student_arch: dict, epochs: int, batch_size: int,
              temperature: float = 4.0, alpha: float = 0.5):  # fmt: skip
    """The chapter's loop, as written: a DataLoader, the teacher forward on every step with autograd on."""
    torch.manual_seed(0)
    student = build_model(student_arch, tuple(x.shape[1:]), int(y.max()) + 1)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        student.train()
        for images, labels in loader:
            teacher_logits = teacher(images)
            student_logits = student(images)
            hard = F.cross_entropy(student_logits, labels)
            soft = F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                            reduction="batchmean") * temperature**2  # fmt: skip
            loss = (1 - alpha) * hard + alpha * soft
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - started)
    student.eval()
    with torch.no_grad():
        acc = float((student(xv).argmax(1) == yv).float().mean())
    return statistics.median(times), acc


def synthetic_images(n: int, seed: int = 0):
    """32×32 RGB images whose class is a fixed random linear function of blurred pixels: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    x = F.avg_pool2d(x, 3, 1, 1)
    w = torch.randn(10, 3 * 8 * 8, generator=g)
    y = (F.adaptive_avg_pool2d(x, 8).flatten(1) @ w.T).argmax(1)
    return x.numpy().astype(np.float32), y.numpy().astype(np.int64)


def bench_pair(label: str, workdir: Path, data: str, val: str, teacher_archs: list[dict], student_arch: dict,
               epochs: int, repeats: int, batch_size: int, teacher_epochs: int) -> dict:  # fmt: skip
    teachers, teacher_accs = zip(*[train_teacher(workdir, f"{label}-teacher{i}", data, val, arch, teacher_epochs,
                                                 batch_size) for i, arch in enumerate(teacher_archs)])  # fmt: skip
    x, y, _ = load_dataset(data, None)
    xv, yv, _ = load_dataset(val, None)
    x, y, xv, yv = (torch.from_numpy(a) for a in (x, y, xv, yv))
    teacher = build_model(teacher_archs[0], tuple(x.shape[1:]), int(y.max()) + 1)
    from safetensors.torch import load_file

    teacher.load_state_dict(load_file(teachers[0].weights_path))
    teacher.eval()
    kd = {"type": "kd", "temperature": 4.0, "alpha": 0.5}
    multi = {"type": "multi_teacher", "fusion": "mean", "temperature": 4.0, "alpha": 0.5}
    times: dict[str, list[float]] = {"student_only": [], "seed_loop": [], "kd": [], "multi_teacher": []}
    acc: dict[str, float] = {}
    cache_seconds = []
    for r in range(repeats):  # interleaved, so drift in machine speed hits every variant alike
        res = engine_run(workdir, f"{label}-a{r}", data, val, student_arch, {"type": "supervised"}, [], epochs,
                         batch_size)  # fmt: skip
        times["student_only"].append(epoch_seconds(res))
        acc["student_only"] = res.summary["val_accuracy"]
        t, acc["seed_loop"] = seed_loop(x, y, xv, yv, teacher, student_arch, epochs, batch_size)
        times["seed_loop"].append(t)
        res = engine_run(workdir, f"{label}-c{r}", data, val, student_arch, kd, [teachers[0]], epochs, batch_size)
        times["kd"].append(epoch_seconds(res))
        cache_seconds.append(res.summary["phases"].get("teacher_cache", 0.0))
        acc["kd"] = res.summary["val_accuracy"]
        res = engine_run(workdir, f"{label}-d{r}", data, val, student_arch, multi, list(teachers), epochs,
                         batch_size)  # fmt: skip
        times["multi_teacher"].append(epoch_seconds(res))
        acc["multi_teacher"] = res.summary["val_accuracy"]
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = lambda arch: count_parameters(build_model(arch, tuple(x.shape[1:]), int(y.max()) + 1))  # noqa: E731
    return {
        "pair": label, "rows": len(x), "epochs": epochs, "repeats": repeats, "batch_size": batch_size,
        "teacher_params": [n_params(a) for a in teacher_archs], "student_params": n_params(student_arch),
        "teacher_accuracy": list(teacher_accs), "epoch_seconds": med, "epoch_seconds_all": times,
        "teacher_cache_seconds": statistics.median(cache_seconds), "final_accuracy": acc,
        "kd_over_student_only": med["kd"] / med["student_only"],
        "seed_loop_over_kd": med["seed_loop"] / med["kd"],
        "multi_teacher_over_student_only": med["multi_teacher"] / med["student_only"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run (median epoch taken)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--skip-images", action="store_true", help="only the MNIST-1D pair")
    args = parser.parse_args()
    torch.manual_seed(0)
    kernels.warm()  # as a worker does at start: the fused loss kernel's one-time compile is not an epoch's cost
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        x, y, _ = load_dataset("builtin:mnist1d", None)
        np.savez(workdir / "mnist1d-16k.npz", x=x[:16000], y=y[:16000])
        np.savez(workdir / "mnist1d-val.npz", x=x[16000:18000], y=y[16000:18000])
        mlp = {"name": "mlp", "config": {"hidden_sizes": [56]}}
        results = [bench_pair(
            "mnist1d", workdir, str(workdir / "mnist1d-16k.npz"), str(workdir / "mnist1d-val.npz"),
            [{"name": "cnn1d", "config": {"channels": 50}}, {"name": "cnn1d", "config": {"channels": 32}},
             {"name": "mlp", "config": {"hidden_sizes": [256, 256]}}],
            mlp, args.epochs, args.repeats, batch_size=128, teacher_epochs=5,
        )]  # fmt: skip
        if not args.skip_images:
            xi, yi = synthetic_images(2560)
            np.savez(workdir / "img.npz", x=xi[:2048], y=yi[:2048])
            np.savez(workdir / "img-val.npz", x=xi[2048:], y=yi[2048:])
            results.append(bench_pair(
                "resnet_cifar", workdir, str(workdir / "img.npz"), str(workdir / "img-val.npz"),
                [{"name": "resnet_cifar", "config": {"depth": 14, "width": 1}},
                 {"name": "resnet_cifar", "config": {"depth": 8, "width": 2}},
                 {"name": "cnn2d", "config": {}}],
                {"name": "resnet_cifar", "config": {"depth": 8, "width": 1}},
                max(1, args.epochs - 1), args.repeats, batch_size=128, teacher_epochs=2,
            ))  # fmt: skip
    print(f"{'pair':<13}{'student-only':>14}{'seed loop':>11}{'engine kd':>11}{'multi (3)':>11}"
          f"{'kd/a':>7}{'seed/kd':>9}{'multi/a':>9}{'acc seed':>10}{'acc kd':>8}")  # fmt: skip
    for r in results:
        s = r["epoch_seconds"]
        print(f"{r['pair']:<13}{s['student_only']:>13.3f}s{s['seed_loop']:>10.3f}s{s['kd']:>10.3f}s"
              f"{s['multi_teacher']:>10.3f}s{r['kd_over_student_only']:>7.2f}{r['seed_loop_over_kd']:>9.2f}"
              f"{r['multi_teacher_over_student_only']:>9.2f}{r['final_accuracy']['seed_loop']:>10.3f}"
              f"{r['final_accuracy']['kd']:>8.3f}")  # fmt: skip
    headline = {k: results[0][k] for k in ("kd_over_student_only", "seed_loop_over_kd",
                                           "multi_teacher_over_student_only")}  # fmt: skip
    report = {**headline, "torch": torch.__version__, "threads": torch.get_num_threads(), "pairs": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(headline))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
