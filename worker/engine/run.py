"""``run_distillation``: one job from spec to artifacts.

Phases, each timed: load (spec, data, models) → teacher_cache (teacher evaluation,
teacher outputs once) → train (``trainer.fit``, once per stage of the method:
one for most methods, a chain for teacher assistants and born-again generations)
→ baseline (optional, the same student supervised) → evaluate (sizes, latency) →
export (safetensors, ONNX, the method's extra artifacts, metrics.json, model
card). The worker supplies paths and callbacks; nothing here knows about
databases or queues, and nothing here knows a method by name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import recipe
from .architectures import build_student, count_parameters, describe, load_model
from .augment import POOL_BYTES, TEACHER_OUTPUTS, Pipeline, parse_augmentation, pool_bytes, pool_views
from .callbacks import Callback, CallbackList, TrainState
from .config import parse_config, require
from .data import array_identity, describe_source, load_dataset, split_validation, take_rows
from .errors import EngineError
from .evaluate import cpu_latency_ms, fused_predictions
from .export import export_onnx, write_metrics, write_model_card
from .plots import write_training_curves
from .features import feature_bytes, feature_shapes
from .formats import align_labels, data_report, parse_data_options
from .mapped import MappedRows
from .methods import Probe, SupervisedConfig, SupervisedLoss, parse_method
from .teacher_cache import cache_key, teacher_logits, teacher_outputs
from .trainer import (
    Split,
    TrainConfig,
    accuracy,
    agreement,
    autocast_enabled,
    autocast_for,
    fit,
    load_checkpoint,
    predict,
)
from .weights import freeze, read_model_metadata, read_num_classes, save_model

# Keep whole data sets on the accelerator below this size; above it, batches are copied per step
# (from pinned host memory). None = automatic: 40% of the CUDA device's free memory, 2 GiB elsewhere.
_DEVICE_DATA_LIMIT: int | None = None
_DEVICE_DATA_FRACTION = 0.4
# Cache the teachers' tapped intermediate outputs (fp16) for the whole run below this size.
_FEATURE_CACHE_LIMIT = 512 * 1024**2
_LATENCY_ROWS = 32


@dataclass
class TeacherInput:
    architecture: dict  # {"name": "cnn1d", "config": {...}}
    weights_path: Path  # local safetensors file
    sha256: str  # of that file (for cache keys)
    weight: float = 1.0  # used by multi-teacher fusion


@dataclass
class RunInputs:
    job_id: str  # the job being run
    spec: dict  # the normalised job spec JSON
    teachers: list[TeacherInput]  # resolved teacher files, in spec order
    train_data: str  # local .npz/.safetensors path, or "builtin:mnist1d" / "builtin:digits"
    validation_data: str | None  # local path, or None to split validation_fraction off train
    output_dir: Path  # artifacts and checkpoint.pt are written here
    device: str = "cpu"  # "cpu" or "cuda", decided by the caller
    resume_from: Path | None = None  # checkpoint of an earlier attempt of this job
    cache_dir: Path | None = None  # builtin data and teacher-logit caches
    # bf16 autocast of the student forward: None = automatic (CUDA with bf16 support), True / False = force.
    autocast: bool | None = None
    # torch intra-op threads for this run (restored afterwards); None = leave the process's setting.
    num_threads: int | None = None
    # safetensors data files larger than this many bytes are memory-mapped, not loaded; None = 1 GiB.
    data_memory_budget: int | None = None
    # Recipe search (recipe.py) sets these three; a plain job leaves them alone.
    probe_rows: float | None = (
        None  # a probe: train on this fraction of the rows, then stop (no baseline, export)
    )
    progress_window: tuple[float, float] = (0.0, 1.0)  # (start, span) of this run in the job's 0..1 progress
    recipe_report: dict | None = (
        None  # the search's report: ship the better of student and baseline, record it
    )


_UNSET = object()


@dataclass
class RunResult:
    status: str  # "succeeded" or "cancelled"
    artifacts: dict[str, Path] = field(default_factory=dict)  # name -> path; empty when cancelled
    summary: dict = field(default_factory=dict)  # summary metrics (also in metrics.json)


def _empty_summary(job_id: str, method: str | None, device: str) -> dict:
    return {
        "job_id": job_id,
        "method": method,
        "device": device,
        "val_accuracy": None,
        "teacher_accuracy": [],
        "teacher_ensemble_accuracy": None,
        "student_params": None,
        "teacher_params": [],
        "student_bytes": None,
        "teacher_bytes": [],
        "agreement": None,
        "agreement_per_teacher": [],
        "compression_ratio": None,
        "speedup": None,
        "student_latency_ms": None,
        "teacher_latency_ms": [],
        "baseline_accuracy": None,
        "own_settings_baseline_accuracy": None,  # recipe search only: a baseline with the job's own augmentation
        "kd_gain": None,
        "gap_recovered": None,
        "phases": {},
        "num_classes": None,
        "input_shape": None,
        "input_dtype": None,
        "n_train": None,
        "n_val": None,
        "epochs": None,
        "epochs_completed": 0,
        "teacher_cache": None,
        "augmentation": [],
        "teacher_outputs": None,
        "onnx_opset": None,
        "onnx_max_abs_diff": None,
        "method_metrics": {},
        "stages": None,
        "class_names": None,
    }


def run_distillation(inputs: RunInputs, callbacks: list[Callback]) -> RunResult:
    """Run one job. Raises ``EngineError`` for user-fixable failures."""
    if inputs.num_threads is None:
        return _search_and_run(inputs, callbacks)
    if inputs.num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {inputs.num_threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(inputs.num_threads)
    try:
        return _search_and_run(inputs, callbacks)
    finally:
        torch.set_num_threads(before)


def _search_and_run(inputs: RunInputs, callbacks: list[Callback]) -> RunResult:
    """The job, after a recipe search when the spec asks for one (``recipe.py``)."""
    spec = inputs.spec if isinstance(inputs.spec, dict) else {}
    if not recipe.searched(spec) and spec.get("recipe") != "auto":
        return _run(inputs, callbacks)
    config = parse_config(
        TrainConfig, spec.get("hyperparameters"), code="invalid_spec", prefix="hyperparameters"
    )
    raw_budget = spec.get("recipe_budget", 0.5)
    require(
        isinstance(raw_budget, (int, float)) and not isinstance(raw_budget, bool) and 0 < raw_budget <= 4,
        "invalid_spec",
        f"recipe_budget must be a number in (0, 4], got {raw_budget!r}",
        "recipe_budget",
    )
    x, y, _ = load_dataset(
        inputs.train_data, inputs.cache_dir, inputs.data_memory_budget, parse_data_options(spec.get("data"))
    )
    pool = recipe.candidates(spec, floating_inputs=x.dtype.kind != "i", has_labels=y is not None)
    del x, y
    budget = max(1.0, raw_budget * config.epochs)
    # The job's progress: probes first, then the student and its baseline (2 × epochs).
    probe_share = budget / (budget + 2 * config.epochs) if pool else 0.0
    cbs = CallbackList(callbacks)
    spent_so_far = [0.0]

    def probe(cand: recipe.Candidate, epochs: int, rows: float) -> float | None:
        pspec = recipe.apply(spec, cand.overrides)
        pspec["hyperparameters"] = {
            **(spec.get("hyperparameters") or {}),
            "epochs": epochs,
            "baseline": False,
        }
        start = probe_share * spent_so_far[0] / budget
        spent_so_far[0] += epochs * rows
        result = _run(
            dataclasses.replace(
                inputs, spec=pspec, probe_rows=rows, resume_from=None,
                output_dir=Path(inputs.output_dir) / "probes", progress_window=(start, probe_share * epochs * rows / budget),
            ),
            callbacks,
        )  # fmt: skip
        if result.status == "cancelled":
            raise _Cancelled(result)
        return result.summary["val_accuracy"]

    def log(level, message, **data):
        cbs.on_log(TrainState(job_id=inputs.job_id, phase="recipe"), level, message, data)

    try:
        if pool:
            chosen, spent = recipe.successive_halving(
                pool, budget=budget, epochs_cap=config.epochs, probe=probe, log=log
            )
        else:
            chosen, spent = recipe.Candidate({}), 0.0
    except _Cancelled as stop:
        return stop.result
    final_spec = recipe.apply(spec, chosen.overrides)
    final_spec["hyperparameters"] = {**(spec.get("hyperparameters") or {}), "baseline": True}
    report = {
        "searched": sorted({k for c in pool for k in c.overrides}),
        "budget_epochs": budget,
        "spent_epochs": round(spent, 4),
        "chosen": chosen.overrides,
        "candidates": [{"settings": c.overrides, "rounds": c.rounds} for c in pool],
        "own_augmentation": spec.get("augmentation"),  # for the own-settings baseline; not reported
    }
    log(
        "info", "recipe chosen", settings=chosen.overrides, spent_epochs=report["spent_epochs"], budget=budget
    )
    return _run(
        dataclasses.replace(
            inputs, spec=final_spec, progress_window=(probe_share, 1.0 - probe_share), recipe_report=report
        ),
        callbacks,
    )


class _Cancelled(Exception):
    def __init__(self, result: RunResult):
        super().__init__("cancelled during the recipe search")
        self.result = result


def _run(inputs: RunInputs, callbacks: list[Callback]) -> RunResult:
    cbs = CallbackList(callbacks)
    state = TrainState(job_id=inputs.job_id)
    spec = inputs.spec if isinstance(inputs.spec, dict) else {}
    device = torch.device(inputs.device)
    out_dir = Path(inputs.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    method_type = (spec.get("method") or {}).get("type") if isinstance(spec.get("method"), dict) else None
    summary = _empty_summary(inputs.job_id, method_type, str(device))
    autocast = autocast_enabled(device, inputs.autocast)
    probing = inputs.probe_rows is not None
    window_start, window_span = inputs.progress_window
    spill_dir = Path(inputs.cache_dir) if inputs.cache_dir is not None else out_dir
    phases: dict[str, float] = summary["phases"]

    def log(level: str, message: str, **data) -> None:
        cbs.on_log(state, level, message, data)

    @contextlib.contextmanager
    def phase(name: str):
        state.phase = name
        started = time.perf_counter()
        try:
            yield
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started

    def cancelled() -> RunResult:
        log("info", "job cancelled", epochs_completed=summary["epochs_completed"], phase=state.phase)
        return RunResult("cancelled", {}, summary)

    # ---- load: spec, data, teachers ------------------------------------------------------------
    with phase("load"):
        config = parse_config(
            TrainConfig, spec.get("hyperparameters"), code="invalid_spec", prefix="hyperparameters"
        )
        student_arch = (spec.get("student") or {}).get("architecture")
        summary["epochs"] = config.epochs

        budget, data_options = inputs.data_memory_budget, parse_data_options(spec.get("data"))
        x, y, extras = load_dataset(inputs.train_data, inputs.cache_dir, budget, data_options)
        file_split = extras.pop("validation", None)  # an image zip's val/ folder
        if inputs.validation_data is not None:
            if file_split is not None:
                raise EngineError("invalid_spec", "train_file holds its own val/ folder; give no validation_file",
                                  param="validation_file")  # fmt: skip
            xv, yv, extras_v = load_dataset(inputs.validation_data, inputs.cache_dir, budget, data_options)
            _check_validation_matches(x, extras, xv, extras_v)
            yv = align_labels(yv, extras_v.get("class_names"), extras.get("class_names"))
            validation_label = describe_source(inputs.validation_data)
        elif file_split is not None:
            (xv, yv), extras_v = file_split, {}
            validation_label = "the val/ folder of train_file"
        else:
            train_idx, val_idx = split_validation(len(x), config.validation_fraction, config.seed)
            # By index: in-memory arrays are copied, mapped ones become views (nothing is read).
            xv, yv = take_rows(x, val_idx), take_rows(y, val_idx)
            x, y = take_rows(x, train_idx), take_rows(y, train_idx)
            extras_v = {}
            if "x_teacher" in extras:
                extras_v["x_teacher"] = take_rows(extras["x_teacher"], val_idx)
                extras = {**extras, "x_teacher": take_rows(extras["x_teacher"], train_idx)}
            validation_label = f"{config.validation_fraction:g} of train, seed {config.seed}"
        num_classes = _num_classes(y, yv, inputs.teachers)
        class_names = extras.get("class_names")
        if class_names is not None and len(class_names) < num_classes:
            class_names = None  # names for some ids only (a teacher knows more classes): ids are clearer
        report = None
        if not probing:
            report = _data_report(extras, extras_v, x, y, xv, yv, num_classes, class_names)
            summary["class_names"] = class_names
            log("info", "data report", **report)
        if inputs.probe_rows is not None and inputs.probe_rows < 1.0:
            keep = np.sort(
                np.random.default_rng(config.seed).permutation(len(x))[
                    : _probe_rows(len(x), inputs.probe_rows)
                ]
            )
            x, y = take_rows(x, keep), take_rows(y, keep)
            if "x_teacher" in extras:
                extras = {**extras, "x_teacher": take_rows(extras["x_teacher"], keep)}

        loss_fn = parse_method(spec.get("method"), num_classes=num_classes, num_teachers=len(inputs.teachers))
        if loss_fn.requires_labels and (y is None or yv is None):
            raise EngineError(
                "invalid_data",
                f"method {method_type!r} needs labels: the data has no 'y' array",
                param="train_file" if y is None else "validation_file",
            )
        teacher_key = loss_fn.teacher_input
        if (
            loss_fn.uses_teachers
            and teacher_key != "x"
            and (teacher_key not in extras or teacher_key not in extras_v)
        ):
            raise EngineError(
                "invalid_data",
                f"method {method_type!r} needs an {teacher_key!r} array in the data",
                param="train_file",
            )
        xt = extras.get(teacher_key, x) if teacher_key != "x" else x
        xvt = extras_v.get(teacher_key, xv) if teacher_key != "x" else xv

        teacher_inputs = inputs.teachers if loss_fn.uses_teachers else []
        if inputs.teachers and not loss_fn.uses_teachers:
            log(
                "warning",
                f"method {method_type!r} uses no teacher; the {len(inputs.teachers)} teacher(s) are ignored",
            )
        teachers: list[nn.Module] = []
        for i, t in enumerate(teacher_inputs):
            # A model written by this service (a from_job teacher) carries its own architecture.
            arch = t.architecture or read_model_metadata(t.weights_path)["architecture"]
            teacher = load_model(
                arch, t.weights_path, xt.shape[1:], num_classes,
                who=f"teacher {i}", param=f"teachers[{i}]", param_prefix=f"teachers[{i}].architecture",
            )  # fmt: skip
            teachers.append(freeze(teacher).to(device))
            _check_input_kind(teacher, xt, f"teacher {i}", "train_file")
        teacher_weights = [float(t.weight) for t in teacher_inputs]
        stages = loss_fn.stages()

        data_bytes = _nbytes(x, y, xt, xv, yv, xvt)
        keep_on = device if data_bytes < _device_data_limit(device) else torch.device("cpu")
        placed: dict = {}  # one copy per (array, dtype), however many teachers read it
        x_all, y_all = _tensor(x, None, keep_on, placed), _tensor(y, None, keep_on, placed)
        xv_all, yv_all = _tensor(xv, None, keep_on, placed), _tensor(yv, None, keep_on, placed)
        teacher_x = [_tensor(xt, t, keep_on, placed) for t in teachers]
        teacher_xv = [_tensor(xvt, t, keep_on, placed) for t in teachers]
        del placed
        def augmentation_of(raw) -> Pipeline:
            return parse_augmentation(
                raw,
                sample_shape=tuple(x.shape[1:]),
                floating=x.dtype.kind != "i",
                num_classes=num_classes,
                # Only noise reads it; reading 10k rows of a mapped file for nothing is avoided.
                input_std=_input_std(x_all) if raw not in (None, "none", []) else 1.0,
            )

        augmentation = augmentation_of(spec.get("augmentation"))
        teacher_mode, pool_size = _teacher_outputs_mode(spec, augmentation, loss_fn)
        summary["augmentation"] = augmentation.describe()
        summary["teacher_outputs"] = (
            teacher_mode if teachers or any(s.teachers != "none" for s in stages) else None
        )
        summary.update(
            num_classes=num_classes,
            input_shape=[int(d) for d in x.shape[1:]],
            n_train=len(x),
            n_val=len(xv),
        )
        log(
            "info",
            "data loaded",
            n_train=len(x),
            n_val=len(xv),
            input_shape=summary["input_shape"],
            num_classes=num_classes,
            train=describe_source(inputs.train_data),
            validation=validation_label,
            storage=_storage(x_all, keep_on),
            autocast=autocast,
        )
        resume = _load_resume(inputs, log)

    # ---- teacher cache: the job's teachers evaluated once (their train outputs: per stage, below)
    with phase("teacher_cache"):
        val_logits = []
        for i, (teacher, t) in enumerate(zip(teachers, teacher_inputs)):
            vlogits, _ = teacher_logits(
                teacher,
                teacher_xv[i],
                device,
                who=f"teacher {i}",
                dtype=torch.float32,
                cache_dir=inputs.cache_dir,
                key=_cache_key(t, teacher, num_classes, xvt, torch.float32),
            )
            val_logits.append(vlogits)
            acc = accuracy(vlogits, yv_all)
            summary["teacher_accuracy"].append(acc)
            summary["teacher_params"].append(count_parameters(teacher))
            summary["teacher_bytes"].append(Path(t.weights_path).stat().st_size)
            log(
                "info",
                "teacher evaluated",
                teacher=i,
                architecture=describe(teacher.architecture),
                val_accuracy=acc,
                params=summary["teacher_params"][-1],
            )
        reference = fused_predictions(val_logits, teacher_weights)
        if len(val_logits) > 1:
            summary["teacher_ensemble_accuracy"] = accuracy_of(reference, yv_all)

    # ---- train: one model per stage (one stage for most methods; a chain for TAKD / born-again)
    baseline_epochs = config.epochs if _wants_baseline(config, loss_fn) else 0
    total_epochs = sum(s.epochs or config.epochs for s in stages) + baseline_epochs
    resume_stage = int(resume.get("stage", 0)) if resume is not None else 0
    done_epochs, completed, previous = 0, [], None
    for i, stage in enumerate(stages):
        final = i == len(stages) - 1
        stage_config = dataclasses.replace(config, epochs=stage.epochs) if stage.epochs else config
        loss = stage.loss

        with phase("load"):
            # Seeded right before each model so its init is the same on every attempt and for the baseline.
            torch.manual_seed(config.seed)
            model = build_student(
                stage.architecture or student_arch, x.shape[1:], num_classes, teachers,
                param_prefix=stage.param, log=log,
            )  # fmt: skip
            architecture = model.architecture
            _check_input_kind(model, x, "student" if final else stage.name, "train_file")
            model = loss.wrap_student(model).to(device)
            # This stage's teachers: the job's, the previous stage's model, or none.
            if stage.teachers == "spec":
                s_teachers, s_tx, s_vtx, s_weights = teachers, teacher_x, teacher_xv, teacher_weights
            elif stage.teachers == "previous":
                s_teachers, s_weights = [previous], [1.0]
                s_tx, s_vtx = [_as_input(x_all, previous)], [_as_input(xv_all, previous)]
            else:
                s_teachers, s_tx, s_vtx, s_weights = [], [], [], []
            train = Split(_as_input(x_all, model), y_all, teacher_x=s_tx)
            val = Split(_as_input(xv_all, model), yv_all, teacher_x=s_vtx)
            if final:
                summary["input_dtype"] = str(train.x.dtype).replace("torch.", "")
            loss.setup(model, s_teachers, Probe(train.x[:2].to(device), [tx[:2].to(device) for tx in s_tx]))
            loss.to(device)
            stage_resume, resume = _stage_resume(resume, resume_stage, i, model, log)
            if stage_resume is not None and i < resume_stage:  # finished by an earlier attempt
                model.load_state_dict(stage_resume["model"])
                completed.append(stage_resume)
                previous = freeze(model)
                done_epochs += stage_config.epochs
                log("info", "stage restored from checkpoint", stage=stage.name)
                continue
            if stage_resume is not None:
                log("info", "resuming from checkpoint", epoch=int(stage_resume["epoch"]), stage=stage.name)

        with phase("teacher_cache"):
            cache_status = _cache_teacher_outputs(
                train, s_teachers, loss, device, log, mode=teacher_mode,
                cache_dir=inputs.cache_dir, spill_dir=spill_dir,
                keys=[_cache_key(t, tm, num_classes, xt, torch.float16) for t, tm in zip(teacher_inputs, teachers)]
                if stage.teachers == "spec" else [None] * len(s_teachers),
            )  # fmt: skip
            if stage.teachers == "spec" and teachers:
                summary["teacher_cache"] = cache_status
            if stage.teachers == "previous" and not teachers:
                stage_reference = predict(previous, s_vtx[0], device).argmax(-1)
            else:
                stage_reference = reference
            views = None
            if teacher_mode == "pool" and s_teachers:
                views = _pool(
                    train, s_teachers, augmentation, pool_size, num_classes, config, device, autocast, log
                )

        with phase("train"):
            state.phase = "recipe" if probing else "train" if final else _phase_name(stage.name)
            state.progress_start = window_start + window_span * done_epochs / total_epochs
            state.progress_span = window_span * stage_config.epochs / total_epochs
            fit(
                student=model,
                loss_fn=loss,
                teachers=s_teachers,
                teacher_weights=s_weights,
                train=train,
                val=val,
                val_reference=stage_reference,
                config=stage_config,
                state=state,
                callbacks=cbs,
                device=device,
                checkpoint_path=None if probing else out_dir / "checkpoint.pt",
                resume=stage_resume,
                checkpoint_extra={"stage": i, "stages": completed},
                autocast=autocast,
                augmentation=augmentation,
                views=views,
            )
        done_epochs += stage_config.epochs
        if state.cancelled:
            summary["epochs_completed"] = state.epoch
            return cancelled()
        result = {
            "name": stage.name,
            "architecture": architecture,
            "val_accuracy": state.history[-1]["val_accuracy"] if state.history else None,
            "params": count_parameters(loss.export_model(model)),
            "epochs": stage_config.epochs,
            "history": state.history,
        }
        if not final:
            completed.append({"model": model.state_dict(), "result": result})
            previous = freeze(model)
            log("info", "stage finished", stage=stage.name, val_accuracy=result["val_accuracy"])
    student, final_loss, student_arch = model, loss, architecture
    stage_results = [c["result"] for c in completed] + [result]
    history = state.history
    summary["epochs_completed"] = state.epoch
    if history:
        summary["val_accuracy"] = history[-1]["val_accuracy"]
        summary["agreement"] = history[-1]["teacher_agreement"]
        summary["method_metrics"] = dict(history[-1].get("method_metrics") or {})
    if len(stage_results) > 1:
        summary["stages"] = [{k: v for k, v in r.items() if k != "history"} for r in stage_results]
    log("info", "training finished", epochs=state.epoch, val_accuracy=summary["val_accuracy"])
    if probing:
        return RunResult("succeeded", {}, summary)

    # ---- baseline: the same student, supervised, same budget and seed -------------------------
    # Under a recipe search that changed the augmentation, a second baseline keeps the user's own
    # augmentation: the shipped model must beat what they would have trained without a teacher, too.
    baselines = [("baseline", augmentation)] if baseline_epochs else []
    own_augmentation = (inputs.recipe_report or {}).get("own_augmentation", _UNSET)
    if baselines and own_augmentation is not _UNSET:
        own = augmentation_of(own_augmentation)
        if own.describe() != augmentation.describe():
            baselines.append(("own-settings baseline", own))
            total_epochs += baseline_epochs
    baseline_history: list[dict] = []
    trained_baselines: list[tuple[str, nn.Module, float]] = []
    for label, base_augmentation in baselines:
        with phase("baseline"):
            torch.manual_seed(config.seed)
            base = build_student(
                student_arch, x.shape[1:], num_classes, teachers, param_prefix="student.architecture"
            ).to(device)
            base_loss = SupervisedLoss(SupervisedConfig(), num_classes=num_classes, num_teachers=0).to(device)
            state.progress_start = window_start + window_span * done_epochs / total_epochs
            state.progress_span = window_span * baseline_epochs / total_epochs
            fit(
                student=base,
                loss_fn=base_loss,
                teachers=[],
                teacher_weights=[],
                train=Split(_as_input(x_all, base), y_all),
                val=Split(_as_input(xv_all, base), yv_all),
                val_reference=reference,
                config=config,
                state=state,
                callbacks=cbs,
                device=device,
                autocast=autocast,
                augmentation=base_augmentation,  # the same augmentation: the gain is the teacher's alone
            )
            done_epochs += baseline_epochs
        if state.cancelled:
            return cancelled()
        base_accuracy = state.history[-1]["val_accuracy"]
        trained_baselines.append((label, base, base_accuracy))
        if label == "baseline":
            baseline_history = state.history
            _fill_baseline(summary, base_accuracy)
            log("info", "baseline finished", val_accuracy=base_accuracy, kd_gain=summary["kd_gain"])
        else:
            summary["own_settings_baseline_accuracy"] = base_accuracy
            log(
                "info",
                "own-settings baseline finished",
                val_accuracy=base_accuracy,
                augmentation=base_augmentation.describe(),
            )
    if inputs.recipe_report is not None:
        summary["recipe"] = dict(inputs.recipe_report, shipped="student")
        summary["recipe"].pop("own_augmentation", None)
        best = max(trained_baselines, key=lambda b: b[2], default=None)
        if best is not None and best[2] > (summary["val_accuracy"] or 0.0):
            # No distillation setting beat the same-budget baselines: ship the better model and say so.
            label, student, base_accuracy = best
            final_loss = base_loss
            summary["recipe"].update(shipped=label, distilled_val_accuracy=summary["val_accuracy"])
            summary["val_accuracy"] = base_accuracy
            summary["method_metrics"] = {}
            log(
                "warning",
                f"no distillation setting beat the same-budget {label} on validation; the {label} is shipped",
                student=summary["recipe"]["distilled_val_accuracy"],
                baseline=base_accuracy,
            )

    # ---- evaluate: final agreement per teacher, sizes, CPU latency ----------------------------
    with phase("evaluate"):
        student.eval()
        exported = final_loss.export_model(student).eval()
        final_logits = predict(student, val.x, device)
        summary["agreement_per_teacher"] = [agreement(final_logits, v.argmax(-1)) for v in val_logits]
        summary["student_params"] = count_parameters(exported)
        summary["student_latency_ms"] = cpu_latency_ms(exported, val.x[:_LATENCY_ROWS])
        summary["teacher_latency_ms"] = [
            cpu_latency_ms(t, tx[:_LATENCY_ROWS]) for t, tx in zip(teachers, teacher_xv)
        ]
        if teachers:
            summary["compression_ratio"] = sum(summary["teacher_params"]) / summary["student_params"]
            summary["speedup"] = sum(summary["teacher_latency_ms"]) / summary["student_latency_ms"]

    # ---- export: weights, ONNX, the method's own artifacts, metrics, model card ------------------
    with phase("export"):
        artifacts: dict[str, Path] = {}
        model_path = out_dir / "model.safetensors"
        metadata = {
            "architecture": student_arch,
            "input_shape": summary["input_shape"],
            "input_dtype": summary["input_dtype"],
            "num_classes": num_classes,
            "class_names": class_names,
            "job_id": inputs.job_id,
            "method": spec.get("method"),
            "val_accuracy": summary["val_accuracy"],
        }
        save_model(exported, model_path, metadata)
        artifacts["model.safetensors"] = model_path
        summary["student_bytes"] = model_path.stat().st_size
        onnx_path = out_dir / "model.onnx"
        try:
            onnx_info = export_onnx(_cpu_copy(exported, device), val.x[:8].to("cpu"), onnx_path)
        except Exception as err:  # noqa: BLE001 - an export bug must not throw away a finished training run
            log(
                "error",
                "ONNX export failed; model.onnx is not produced",
                error=f"{type(err).__name__}: {err}",
            )
        else:
            for f in onnx_info["files"]:
                artifacts[f.name] = f
            summary["onnx_opset"] = onnx_info["opset"]
            summary["onnx_max_abs_diff"] = onnx_info["max_abs_diff"]
        # An architecture's own format (a transformers student: its save_pretrained folder, zipped).
        artifacts.update(exported.export_files(out_dir) if hasattr(exported, "export_files") else {})
        extra_files, extra_metrics = final_loss.write_artifacts(
            student, out_dir, metadata, val.x, val.y, device
        )
        artifacts.update(extra_files)
        if extra_metrics:
            summary["method_metrics"] = {**(summary.get("method_metrics") or {}), **extra_metrics}
    state.phase = "done"

    metrics_path, card_path = out_dir / "metrics.json", out_dir / "model_card.md"
    write_metrics(
        metrics_path,
        {
            "summary": summary,
            "history": history,
            "baseline_history": baseline_history,
            "stage_history": {r["name"]: r["history"] for r in stage_results[:-1]},
            "phases": phases,
            "data_report": report,
        },
    )
    artifacts["metrics.json"] = metrics_path
    curves_path = out_dir / "training_curves.png"
    try:
        write_training_curves(curves_path, history=history, baseline_history=baseline_history,
                              teacher_accuracy=summary["teacher_accuracy"], method=str(method_type),
                              title=f"{spec.get('name') or inputs.job_id} · method {method_type}")  # fmt: skip
    except Exception as err:  # noqa: BLE001 - a plotting bug must not throw away a finished training run
        log("error", "training_curves.png could not be drawn", error=f"{type(err).__name__}: {err}")
    else:
        artifacts[curves_path.name] = curves_path
    teacher_rows = [
        {
            "label": describe(teacher.architecture),
            "accuracy": summary["teacher_accuracy"][i],
            "params": summary["teacher_params"][i],
            "bytes": summary["teacher_bytes"][i],
            "latency_ms": summary["teacher_latency_ms"][i],
        }
        for i, teacher in enumerate(teachers)
    ]
    write_model_card(
        card_path,
        spec=spec,
        summary=summary,
        history=history,
        teachers=teacher_rows,
        data={
            "train": describe_source(inputs.train_data),
            "validation": validation_label,
            "n_train": len(x),
            "n_val": len(xv),
            "report": report,
        },
        extra_files=sorted(extra_files),
        curves_file=curves_path.name if curves_path.name in artifacts else None,
    )
    artifacts["model_card.md"] = card_path
    log("info", "artifacts written", artifacts=sorted(artifacts))
    return RunResult("succeeded", artifacts, summary)


# --------------------------------------------------------------------------- helpers


def _wants_baseline(config: TrainConfig, loss_fn) -> bool:
    # A supervised run is its own baseline.
    return config.baseline and not loss_fn.is_baseline


def _num_classes(y: np.ndarray | None, yv: np.ndarray | None, teachers: list[TeacherInput]) -> int:
    """max label + 1; without labels anywhere (cross-modal from the teacher alone), the teacher's class count."""
    labels = [a for a in (y, yv) if a is not None and len(a)]
    if labels:
        return max(int(a.max()) for a in labels) + 1
    counts = [read_num_classes(t.weights_path) for t in teachers]
    if counts and counts[0] is not None:
        return counts[0]
    raise EngineError(
        "invalid_data", "the data has no labels 'y', so the class count is unknown", "train_file"
    )


def _data_report(extras, extras_v, x, y, xv, yv, num_classes: int, class_names) -> dict:
    """``formats.data_report`` for this job's splits; missing values per file, for tables only."""
    missing = None
    if extras.get("missing") is not None or extras_v.get("missing") is not None:
        missing = {"train_file": extras.get("missing") or {}, "validation_file": extras_v.get("missing") or {}}
    return data_report(
        fmt=extras["format"], x=x, y=y, xv=xv, yv=yv, num_classes=num_classes, class_names=class_names,
        stored_dtype=extras.get("stored_dtype"), missing=missing, x_teacher=extras.get("x_teacher"),
    )  # fmt: skip


def accuracy_of(predictions: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
    if predictions is None or y is None or len(y) == 0:
        return None
    return (predictions == y.to(predictions.device)).float().mean().item()


def _phase_name(stage_name: str) -> str:
    """``assistant 1`` → ``assistant_1``: the ``phase`` of an intermediate stage's epoch rows."""
    return stage_name.replace(" ", "_")


def _fits(model: nn.Module, state_dict: dict) -> bool:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return expected == {k: tuple(v.shape) for k, v in state_dict.items()}


def _stage_resume(resume: dict | None, resume_stage: int, i: int, model: nn.Module, log):
    """(what stage ``i`` resumes from, the checkpoint still in use).

    Stages before the checkpoint's own were finished by an earlier attempt: their
    saved ``{"model", "result"}``. The checkpoint's stage: the checkpoint itself. A
    saved model that does not fit drops the checkpoint from this stage on.
    """
    if resume is None or i > resume_stage:
        return None, resume
    saved = resume if i == resume_stage else resume["stages"][i]
    if _fits(model, saved["student" if i == resume_stage else "model"]):
        return saved, resume
    log("warning", "checkpoint does not match the student architecture; starting from epoch 0")
    return None, None


def _cache_teacher_outputs(
    split: Split,
    teachers: list[nn.Module],
    loss,
    device: torch.device,
    log,
    *,
    mode,
    cache_dir,
    spill_dir,
    keys,
) -> str | None:
    """Fill ``split.teacher_logits`` (and ``teacher_features``) once, if the method and mode allow it.

    Returns "hit" / "built" / "fresh" (the loop runs the teachers per step) / "pool", or
    None without teachers. Tapped features are cached only within ``_FEATURE_CACHE_LIMIT``.
    """
    if not teachers:
        return None
    if mode in ("fresh", "pool"):
        return mode
    if not loss.cacheable:
        return "fresh"
    taps = loss.teacher_taps
    if taps:
        need = sum(
            feature_bytes(feature_shapes(t, tx[:2].to(device), taps), len(tx))
            for t, tx in zip(teachers, split.teacher_x)
        )
        if need > _FEATURE_CACHE_LIMIT:
            log(
                "info",
                "teacher features exceed the cache budget; the teachers run every step",
                bytes=need,
                limit=_FEATURE_CACHE_LIMIT,
            )
            return "fresh"
    hits = []
    for i, (teacher, tx) in enumerate(zip(teachers, split.teacher_x)):
        started = time.perf_counter()
        if taps:
            logits, feats = teacher_outputs(teacher, tx, taps, device, who=f"teacher {i}")
            split.teacher_features.append(feats)
            hit = False
        else:
            logits, hit = teacher_logits(
                teacher, tx, device, who=f"teacher {i}", dtype=torch.float16, cache_dir=cache_dir, key=keys[i],
                spill_dir=spill_dir,
            )  # fmt: skip
        split.teacher_logits.append(logits)
        hits.append(hit)
        log(
            "info",
            "teacher cache hit" if hit else "teacher cache built",
            teacher=i,
            rows=len(logits),
            features=sorted(taps),
            seconds=round(time.perf_counter() - started, 3),
            storage="mapped" if isinstance(logits, MappedRows) else "memory",
        )
    return "hit" if all(hits) else "built"


def _fill_baseline(summary: dict, baseline: float | None) -> None:
    student = summary["val_accuracy"]
    summary["baseline_accuracy"] = baseline
    if baseline is None or student is None:
        return
    summary["kd_gain"] = 100.0 * (student - baseline)
    teacher = (
        summary["teacher_ensemble_accuracy"]
        if len(summary["teacher_accuracy"]) > 1
        else (summary["teacher_accuracy"][0] if summary["teacher_accuracy"] else None)
    )
    # Only meaningful when the teacher beats the baseline; otherwise there is no gap to recover.
    if teacher is not None and teacher - baseline > 1e-12:
        summary["gap_recovered"] = (student - baseline) / (teacher - baseline)


def _input_std(x) -> float:
    """Standard deviation of the inputs the student reads (first 10k rows), for ``noise``'s scale."""
    rows = x[:10_000]
    return float(rows.float().std()) if rows.is_floating_point() or rows.dtype == torch.uint8 else 1.0


def _teacher_outputs_mode(spec: dict, augmentation: Pipeline, loss) -> tuple[str, int]:
    """``spec.teacher_outputs`` checked against the augmentation and the method; null = automatic."""
    mode = spec.get("teacher_outputs")
    require(
        mode is None or mode in TEACHER_OUTPUTS,
        "invalid_spec",
        f"unknown teacher_outputs {mode!r}; valid: {', '.join(TEACHER_OUTPUTS)}",
        "teacher_outputs",
    )
    pool_size = spec.get("pool_size", 8)
    require(
        isinstance(pool_size, int) and not isinstance(pool_size, bool) and 1 <= pool_size <= 64,
        "invalid_spec",
        f"pool_size must be an integer in [1, 64], got {pool_size!r}",
        "pool_size",
    )
    if not augmentation:
        require(
            mode != "pool",
            "invalid_spec",
            "teacher_outputs 'pool' holds augmented views: set an augmentation, or use cached",
            "teacher_outputs",
        )
        return mode or "cached", pool_size
    require(
        not loss.uses_teachers or loss.teacher_input == "x",
        "invalid_spec",
        f"the teachers read {loss.teacher_input!r}, which an augmentation of 'x' does not change; "
        "consistent teaching needs both to see the same input: drop the augmentation",
        "augmentation",
    )
    require(
        mode != "cached",
        "invalid_spec",
        "cached teacher outputs need unaugmented inputs: use fresh (the teachers score every augmented "
        "batch) or pool (augmented views scored once)",
        "teacher_outputs",
    )
    require(
        not (mode == "pool" and loss.teacher_taps),
        "invalid_spec",
        "a pool keeps the teachers' logits only and this method matches intermediate features: use fresh",
        "teacher_outputs",
    )
    return mode or "fresh", pool_size


def _pool(
    train: Split, teachers, augmentation, size: int, num_classes: int, config, device, autocast, log
) -> list[Split]:
    """The teacher-output pool for this stage: ``size`` augmented, scored copies of the rows."""
    require(
        isinstance(train.x, torch.Tensor),
        "invalid_spec",
        "a pool needs the training data in memory; this data set is memory-mapped: use fresh",
        "teacher_outputs",
    )
    n, sample = len(train.x), train.x[0].numel() * train.x.element_size()
    need = pool_bytes(n, sample, num_classes, len(teachers), size)
    require(
        need <= POOL_BYTES,
        "invalid_spec",
        f"a pool of {size} views of {n} rows needs {need / 2**30:.1f} GiB (limit {POOL_BYTES / 2**30:.0f} GiB): "
        "lower pool_size or use fresh",
        "pool_size",
    )
    started = time.perf_counter()
    views = pool_views(
        train.x, train.y, teachers, [tx.dtype for tx in train.teacher_x], augmentation,
        size=size, seed=config.seed, device=device, batch_size=config.batch_size,
        autocast_context=lambda: autocast_for(device, autocast),
    )  # fmt: skip
    log(
        "info",
        "teacher pool built",
        views=size,
        rows=n,
        bytes=need,
        seconds=round(time.perf_counter() - started, 3),
    )
    return [Split(vx, vy, teacher_logits=vl) for vx, vy, vl in views]


def _probe_rows(n: int, fraction: float) -> int:
    """Rows a probe trains on: the fraction, but at least 256 (a few batches) and at most all."""
    return min(n, max(256, math.ceil(fraction * n)))


def _check_validation_matches(x, extras, xv, extras_v) -> None:
    if xv.shape[1:] != x.shape[1:]:
        raise EngineError(
            "invalid_data",
            f"validation 'x' has per-sample shape {list(xv.shape[1:])}, train has {list(x.shape[1:])}",
            param="validation_file",
        )
    if (xv.dtype.kind == "f") != (x.dtype.kind == "f"):
        raise EngineError(
            "invalid_data", f"validation 'x' is {xv.dtype}, train 'x' is {x.dtype}", param="validation_file"
        )
    if (
        "x_teacher" in extras
        and "x_teacher" in extras_v
        and extras["x_teacher"].shape[1:] != extras_v["x_teacher"].shape[1:]
    ):
        raise EngineError(
            "invalid_data", "validation 'x_teacher' shape differs from train", param="validation_file"
        )


def _check_input_kind(model: nn.Module, x: np.ndarray, who: str, param: str) -> None:
    wants_tokens = getattr(model, "input_dtype", torch.float32) == torch.int64
    if wants_tokens:
        if x.dtype.kind == "f":
            raise EngineError(
                "invalid_data",
                f"{who} reads token ids (vocab_size is set) but 'x' is {x.dtype}; "
                "store token ids as an integer array",
                param=param,
            )
        vocab = model.vocab_size if hasattr(model, "vocab_size") else model.embed.num_embeddings
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= vocab:
            raise EngineError(
                "invalid_data",
                f"token ids must be in [0, {vocab}) for vocab_size={vocab}; found values in [{lo}, {hi}]",
                param=param,
            )


def _as_input(t, model: nn.Module):
    """Rows in the dtype ``model`` reads (a no-op when it already is; a view for mapped rows)."""
    dtype = getattr(model, "input_dtype", torch.float32)
    return t.astype(dtype) if isinstance(t, MappedRows) else t.to(dtype)


def _tensor(a, model: nn.Module | None, device: torch.device, placed: dict | None = None):
    """``a`` as rows on ``device`` in ``model``'s input dtype: a tensor, or mapped rows left on the host.

    Mapped rows bound for an accelerator that holds the whole data are copied there a
    chunk at a time. ``placed`` memoises by (array, dtype), so teachers reading the
    same array share one copy.
    """
    if a is None:
        return None
    dtype = getattr(model, "input_dtype", torch.float32) if model is not None else None
    memo = (
        id(a),
        dtype
        or (a.torch_dtype if isinstance(a, MappedRows) else torch.from_numpy(np.empty(0, a.dtype)).dtype),
    )
    if placed is not None and memo in placed:
        return placed[memo]
    if isinstance(a, MappedRows):
        t = a.astype(dtype) if dtype is not None else a
        if device.type != "cpu":
            t = t.to_device(device)
    else:
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a).copy()
        t = torch.from_numpy(a)
        if dtype is not None:
            t = t.to(dtype)
        t = t.to(device)
    if placed is not None:
        placed[memo] = t
    return t


def _nbytes(*arrays) -> int:
    """Bytes of the distinct arrays (the teachers' input is often ``x`` itself)."""
    return sum(a.nbytes for a in {id(a): a for a in arrays if a is not None}.values())


def _device_data_limit(device: torch.device) -> int:
    if _DEVICE_DATA_LIMIT is not None:
        return _DEVICE_DATA_LIMIT
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _DEVICE_DATA_FRACTION)
    return 2 * 1024**3


def _storage(x, keep_on: torch.device) -> str:
    """Where the training rows live: ``mapped`` (read from the file per batch), ``host`` or ``device``."""
    if isinstance(x, MappedRows):
        return "mapped"
    return "device" if keep_on.type != "cpu" else "host"


def _cache_key(
    t: TeacherInput, teacher: nn.Module, num_classes: int, x: np.ndarray, dtype: torch.dtype
) -> str | None:
    # Without the weights' hash there is no safe cross-job key; compute-once-per-run still applies.
    if not t.sha256:
        return None
    return cache_key(t.sha256, teacher.architecture, num_classes, array_identity(x), dtype)


def _cpu_copy(model: nn.Module, device: torch.device) -> nn.Module:
    return model if device.type == "cpu" else copy.deepcopy(model).to("cpu")


def _load_resume(inputs: RunInputs, log) -> dict | None:
    """The earlier attempt's checkpoint, if it belongs to this job (each stage checks that it fits)."""
    if inputs.resume_from is None:
        return None
    path = Path(inputs.resume_from)
    if not path.is_file():
        log("warning", "checkpoint to resume from does not exist; starting from epoch 0", path=path.name)
        return None
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - unreadable: training from zero beats failing the job
        log("warning", "checkpoint unreadable; starting from epoch 0", error=f"{type(err).__name__}: {err}")
        return None
    if ckpt.get("job_id") != inputs.job_id:
        log(
            "warning",
            "checkpoint belongs to another job; starting from epoch 0",
            checkpoint_job=ckpt.get("job_id"),
        )
        return None
    return ckpt
