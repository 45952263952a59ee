"""Engine speed on a CUDA GPU: the ratios of bench/engine.py on the device, bf16 autocast off and on.

Per-epoch wall time (median of interleaved repeats) and samples/s of
  (a) student-only      the engine's `supervised` run of the student
  (b) seed loop         the reference chapter's loop on the device: DataLoader over host tensors, batches
                        copied per step, every teacher forward on every step with autograd recording
  (c) engine kd         the engine's `kd` (teacher logits computed once, on the device)
  (d) engine multi      the engine's `multi_teacher` with 3 teachers of different architectures
each with bf16 autocast off and on (the engine's `RunInputs.autocast`; the seed loop wraps its forwards
in `torch.autocast`), on MNIST-1D (16k rows, cnn1d teacher → MLP) and synthetic 32×32 images
(resnet_cifar teacher → smaller resnet_cifar). Then the data path, engine `kd` on the images:
  device   the whole data on the GPU (the default when it fits: 40% of free device memory)
  host     data left on the host (forced): batches gathered into pinned memory, copied non_blocking
and a micro-benchmark of one batch copy: pinned + non_blocking (`trainer.fetch`) against a pageable copy.

    python -m bench.gpu [--repeats 2] [--epochs 3] [--json]

One run takes a few minutes on an H100 (most of it the per-run ONNX export and CPU latency checks, which
are not in the epoch times). Exits with a message when no CUDA device is available. Writes
docs/bench/gpu.json. (`--device cpu --quick` runs the script's logic on a CPU, for checking the script
only: CPU numbers mean nothing here; bench/engine.py is the CPU benchmark.)
"""

import argparse
import contextlib
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
from torch.utils.data import DataLoader, TensorDataset

from bench.engine import epoch_seconds, hyperparameters, synthetic_images
from worker.engine import Callback, RunInputs, TeacherInput, build_model, kernels, load_dataset, run_distillation
from worker.engine import run as run_module
from worker.engine.trainer import fetch
from worker.engine.weights import load_weights_strict

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "gpu.json"
KD = {"type": "kd", "temperature": 4.0, "alpha": 0.5}
MULTI = {"type": "multi_teacher", "fusion": "mean", "temperature": 4.0, "alpha": 0.5}


class DataEvent(Callback):
    """Keeps the `data loaded` event: where the rows lived and whether autocast was on."""

    def __init__(self):
        self.data = {}

    def on_log(self, state, level, message, data):
        if message == "data loaded":
            self.data = dict(data)


def engine_run(workdir: Path, name: str, data: str, val: str, student: dict, method: dict, teachers, epochs: int,
               batch_size: int, device: str, autocast: bool | None):  # fmt: skip
    spec = {"teachers": [{} for _ in teachers], "student": {"architecture": student}, "method": method,
            "hyperparameters": hyperparameters(epochs, batch_size)}  # fmt: skip
    event = DataEvent()
    inputs = RunInputs(job_id=name, spec=spec, teachers=list(teachers), train_data=data, validation_data=val,
                       output_dir=workdir / name, device=device, autocast=autocast)  # fmt: skip
    result = run_distillation(inputs, [event])
    return result, event.data


def seed_loop(x, y, xv, yv, teacher, student_arch: dict, epochs: int, batch_size: int, device: torch.device,
              bf16: bool, temperature: float = 4.0, alpha: float = 0.5):  # fmt: skip
    """The chapter's loop on the device: host DataLoader, per-step copies, the teacher forward every step."""
    torch.manual_seed(0)
    student = build_model(student_arch, tuple(x.shape[1:]), int(y.max()) + 1).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    times = []
    for _ in range(epochs):
        sync(device)
        started = time.perf_counter()
        student.train()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with cast():
                teacher_logits = teacher(images)
                student_logits = student(images)
            student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
            hard = F.cross_entropy(student_logits, labels)
            soft = F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                            reduction="batchmean") * temperature**2  # fmt: skip
            loss = (1 - alpha) * hard + alpha * soft
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync(device)
        times.append(time.perf_counter() - started)
    student.eval()
    with torch.no_grad():
        acc = float((student(xv.to(device)).argmax(1).cpu() == yv).float().mean())
    return statistics.median(times), acc


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_teacher(workdir, name, data, val, arch, epochs, batch_size, device):
    result, _ = engine_run(workdir, name, data, val, arch, {"type": "supervised"}, [], epochs, batch_size, device,
                           None)  # fmt: skip
    path = result.artifacts["model.safetensors"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return TeacherInput(architecture=arch, weights_path=path, sha256=digest), result.summary["val_accuracy"]


def bench_pair(label, workdir, data, val, teacher_archs, student_arch, epochs, repeats, batch_size, teacher_epochs,
               device: torch.device) -> dict:  # fmt: skip
    started = time.perf_counter()
    dev = str(device)
    trained = [train_teacher(workdir, f"{label}-teacher{i}", data, val, arch, teacher_epochs, batch_size, dev)
               for i, arch in enumerate(teacher_archs)]  # fmt: skip
    teachers = [t for t, _ in trained]
    x, y, _ = load_dataset(data, None)
    xv, yv, _ = load_dataset(val, None)
    x, y, xv, yv = (torch.from_numpy(a) for a in (x, y, xv, yv))
    teacher = build_model(teacher_archs[0], tuple(x.shape[1:]), int(y.max()) + 1)
    load_weights_strict(teacher, teachers[0].weights_path, who="teacher 0")
    teacher = teacher.to(device).eval()
    variants = ("student_only", "seed_loop", "kd", "multi_teacher")
    modes = {"bf16_off": False, "bf16_on": True}
    times = {m: {v: [] for v in variants} for m in modes}
    acc = {m: {} for m in modes}
    applied = {}
    for r in range(repeats):  # interleaved: drift in machine speed hits every variant alike
        for mode, bf16 in modes.items():
            res, ev = engine_run(workdir, f"{label}-a-{mode}{r}", data, val, student_arch, {"type": "supervised"}, [],
                                 epochs, batch_size, dev, bf16)  # fmt: skip
            applied[mode] = ev.get("autocast")
            times[mode]["student_only"].append(epoch_seconds(res))
            acc[mode]["student_only"] = res.summary["val_accuracy"]
            t, acc[mode]["seed_loop"] = seed_loop(x, y, xv, yv, teacher, student_arch, epochs, batch_size, device,
                                                  bf16)  # fmt: skip
            times[mode]["seed_loop"].append(t)
            res, _ = engine_run(workdir, f"{label}-c-{mode}{r}", data, val, student_arch, KD, teachers[:1], epochs,
                                batch_size, dev, bf16)  # fmt: skip
            times[mode]["kd"].append(epoch_seconds(res))
            acc[mode]["kd"] = res.summary["val_accuracy"]
            res, _ = engine_run(workdir, f"{label}-d-{mode}{r}", data, val, student_arch, MULTI, teachers, epochs,
                                batch_size, dev, bf16)  # fmt: skip
            times[mode]["multi_teacher"].append(epoch_seconds(res))
            acc[mode]["multi_teacher"] = res.summary["val_accuracy"]
    out = {"pair": label, "rows": len(x), "epochs": epochs, "repeats": repeats, "batch_size": batch_size,
           "teacher_accuracy": [a for _, a in trained], "autocast_applied": applied, "modes": {}}  # fmt: skip
    for mode in modes:
        med = {v: statistics.median(ts) for v, ts in times[mode].items()}
        out["modes"][mode] = {
            "epoch_seconds": med,
            "samples_per_second": {v: len(x) / s for v, s in med.items()},
            "final_accuracy": acc[mode],
            "kd_over_student_only": med["kd"] / med["student_only"],
            "seed_loop_over_kd": med["seed_loop"] / med["kd"],
            "multi_teacher_over_student_only": med["multi_teacher"] / med["student_only"],
        }
    out["bf16_speedup"] = {v: out["modes"]["bf16_off"]["epoch_seconds"][v] / out["modes"]["bf16_on"]["epoch_seconds"][v]
                           for v in variants}  # fmt: skip
    out["seconds"] = time.perf_counter() - started
    return out


def bench_data_path(workdir, data, val, teacher_arch, student_arch, epochs, repeats, batch_size,
                    device: torch.device) -> dict:  # fmt: skip
    """Engine kd with the data on the device (default) and on the host (pinned staging, non_blocking copies)."""
    dev = str(device)
    teacher, _ = train_teacher(workdir, "path-teacher", data, val, teacher_arch, 1, batch_size, dev)
    times = {"device": [], "host": []}
    storage = {}
    for r in range(repeats):
        for where in ("device", "host"):
            run_module._DEVICE_DATA_LIMIT = None if where == "device" else 0
            try:
                res, ev = engine_run(workdir, f"path-{where}{r}", data, val, student_arch, KD, [teacher], epochs,
                                     batch_size, dev, None)  # fmt: skip
            finally:
                run_module._DEVICE_DATA_LIMIT = None
            storage[where] = ev.get("storage")
            times[where].append(epoch_seconds(res))
    med = {k: statistics.median(v) for k, v in times.items()}

    # One batch's copy: pinned staging + non_blocking (the engine's fetch) against a pageable gather + copy.
    x = torch.from_numpy(load_dataset(data, None)[0])
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(x), generator=g)[:batch_size] for _ in range(200)]

    def timed(copy) -> float:
        for idx in batches[:10]:
            copy(idx)
        sync(device)
        started = time.perf_counter()
        for idx in batches:
            copy(idx)
        sync(device)
        return (time.perf_counter() - started) / len(batches) * 1e6

    pinned_us = timed(lambda idx: fetch(x, idx, device))
    pageable_us = timed(lambda idx: x[idx].to(device))
    return {"epoch_seconds": med, "storage": storage, "host_over_device": med["host"] / med["device"],
            "batch_copy_us": {"pinned_non_blocking": pinned_us, "pageable": pageable_us},
            "rows": len(x), "batch_size": batch_size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run (median epoch taken)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--skip-images", action="store_true", help="only the MNIST-1D pair")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help=argparse.SUPPRESS
    )  # tiny sizes: checks the script
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench.gpu needs a CUDA GPU, and torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
                 "sees none on this machine. Run it on a GPU machine; bench/engine.py is the CPU benchmark.")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("note: this GPU has no bf16 support; bf16_on runs will fail in torch", file=sys.stderr)
    started = time.perf_counter()
    torch.manual_seed(0)
    if device.type == "cpu":
        kernels.warm()  # as a CPU worker does at start (the kernel serves float32 CPU logits only)
    n_train, n_val, n_img = (2000, 500, 640) if args.quick else (16000, 2000, 10240)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        x, y, _ = load_dataset("builtin:mnist1d", None)
        np.savez(workdir / "mnist1d.npz", x=x[:n_train], y=y[:n_train])
        np.savez(workdir / "mnist1d-val.npz", x=x[16000 : 16000 + n_val], y=y[16000 : 16000 + n_val])
        mlp = {"name": "mlp", "config": {"hidden_sizes": [56]}}
        results = [bench_pair(
            "mnist1d", workdir, str(workdir / "mnist1d.npz"), str(workdir / "mnist1d-val.npz"),
            [{"name": "cnn1d", "config": {"channels": 50}}, {"name": "cnn1d", "config": {"channels": 32}},
             {"name": "mlp", "config": {"hidden_sizes": [256, 256]}}],
            mlp, args.epochs, args.repeats, batch_size=128, teacher_epochs=5, device=device,
        )]  # fmt: skip
        print(f"mnist1d pair: {results[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
        data_path = None
        if not args.skip_images:
            xi, yi = synthetic_images(n_img + n_img // 5)
            np.savez(workdir / "img.npz", x=xi[:n_img], y=yi[:n_img])
            np.savez(workdir / "img-val.npz", x=xi[n_img:], y=yi[n_img:])
            resnet = {"name": "resnet_cifar", "config": {"depth": 8, "width": 1}}
            results.append(bench_pair(
                "resnet_cifar", workdir, str(workdir / "img.npz"), str(workdir / "img-val.npz"),
                [{"name": "resnet_cifar", "config": {"depth": 14, "width": 1}},
                 {"name": "resnet_cifar", "config": {"depth": 8, "width": 2}},
                 {"name": "cnn2d", "config": {}}],
                resnet, max(1, args.epochs - 1), args.repeats, batch_size=128, teacher_epochs=2, device=device,
            ))  # fmt: skip
            print(f"resnet_cifar pair: {results[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
            data_path = bench_data_path(workdir, str(workdir / "img.npz"), str(workdir / "img-val.npz"),
                                        {"name": "resnet_cifar", "config": {"depth": 14, "width": 1}}, resnet,
                                        max(1, args.epochs - 1), args.repeats, 128, device)  # fmt: skip

    print(f"\n{'pair':<13}{'bf16':<5}{'student-only':>14}{'seed loop':>11}{'engine kd':>11}{'multi (3)':>11}"
          f"{'kd/a':>7}{'seed/kd':>9}{'multi/a':>9}{'kd samples/s':>14}{'acc seed':>10}{'acc kd':>8}")  # fmt: skip
    for r in results:
        for mode, m in r["modes"].items():
            s = m["epoch_seconds"]
            print(f"{r['pair']:<13}{mode[5:]:<5}{s['student_only']:>13.3f}s{s['seed_loop']:>10.3f}s{s['kd']:>10.3f}s"
                  f"{s['multi_teacher']:>10.3f}s{m['kd_over_student_only']:>7.2f}{m['seed_loop_over_kd']:>9.2f}"
                  f"{m['multi_teacher_over_student_only']:>9.2f}{m['samples_per_second']['kd']:>14.0f}"
                  f"{m['final_accuracy']['seed_loop']:>10.3f}{m['final_accuracy']['kd']:>8.3f}")  # fmt: skip
    if data_path:
        e = data_path["epoch_seconds"]
        c = data_path["batch_copy_us"]
        print(f"\ndata path (engine kd, images): on device {e['device']:.3f} s/epoch ({data_path['storage']['device']}), "
              f"host-resident {e['host']:.3f} s/epoch ({data_path['storage']['host']}), "
              f"ratio {data_path['host_over_device']:.2f}; one batch copy: pinned+non_blocking "
              f"{c['pinned_non_blocking']:.0f} µs, pageable {c['pageable']:.0f} µs")  # fmt: skip
    headline = {mode: {k: results[0]["modes"][mode][k] for k in
                       ("kd_over_student_only", "seed_loop_over_kd", "multi_teacher_over_student_only")}
                for mode in ("bf16_off", "bf16_on")}  # fmt: skip
    report = {
        **headline,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seconds": time.perf_counter() - started,
        "pairs": results,
        "data_path": data_path,
    }
    if device.type == "cuda" and not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(headline))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
