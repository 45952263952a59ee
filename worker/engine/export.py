"""Artifacts: ONNX export (checked in onnxruntime), metrics.json and the model card."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 18  # supported by onnxruntime >= 1.14 and native to the torch.export-based exporter
# Above this many parameter bytes a single-file ONNX (protobuf, 2 GiB cap) is impossible.
_ONNX_SINGLE_FILE_LIMIT = 1_800_000_000


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    """Export ``model`` with input ``x`` (dynamic batch) and output ``logits``; verify in onnxruntime.

    Uses the torch.export-based exporter (``dynamo=True``, the default since torch
    2.9; the TorchScript exporter is deprecated). The example must have batch >= 2:
    torch.export specialises a dimension whose example size is 0 or 1.
    Returns ``{"opset", "max_abs_diff", "files"}`` where ``max_abs_diff`` compares
    onnxruntime with torch on the example rows (None if onnxruntime is missing).
    """
    model = model.to("cpu").eval()
    example = example.to("cpu")
    if len(example) < 2:
        example = torch.cat([example, example])
    path = Path(path)
    param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = param_bytes > _ONNX_SINGLE_FILE_LIMIT
    # The exporter logs a warning per missing optional torchvision op; not our concern.
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["x"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=external,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    files = [path] + ([Path(str(path) + ".data")] if external and Path(str(path) + ".data").exists() else [])
    return {"opset": ONNX_OPSET, "max_abs_diff": _check_onnxruntime(model, example, path), "files": files}


def _check_onnxruntime(model: nn.Module, example: torch.Tensor, path: Path) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"x": example.numpy()})[0]
    with torch.inference_mode():
        want = model(example).float().numpy()
    return float(np.abs(got - want).max())


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value):
    """Replace NaN/inf (invalid in strict JSON) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics(path: Path, metrics: dict) -> None:
    _atomic_text(Path(path), json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- model card


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _num(v, fmt="{:,}") -> str:
    return "–" if v is None else fmt.format(v)


def _size(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _data_report_lines(report: dict) -> list[str]:
    """The model card's "Data report" section: what the model was trained on, and what to watch for."""
    features = ", ".join(f"`{k}` {v['shape']} ({v['dtype']})" for k, v in report["features"].items())
    lines = [
        "",
        "## Data report",
        "",
        f"- Format: `{report['format']}`; features: {features}",
        f"- Rows: {report['rows']['train']:,} train, {report['rows']['validation']:,} validation",
        f"- Validation rows that also occur in train (exact duplicates): {report['duplicates_train_validation']:,}",
    ]
    for source, columns in (report.get("missing_values") or {}).items():
        filled = ", ".join(f"`{c}`: {n:,}" for c, n in columns.items()) or "none"
        lines.append(f"- Missing values in {source} (filled with the column mean): {filled}")
    lines += ["", "| class id | name | train | validation |", "| --- | --- | --- | --- |"]
    for c in report["class_balance"]:
        name = str(c['name']).replace('|', '\\|')
        lines.append(f"| {c['id']} | {name} | {_num(c['train'], '{:,}')} | {_num(c['validation'], '{:,}')} |")
    return lines


def write_model_card(
    path: Path,
    *,
    spec: dict,
    summary: dict,
    history: list[dict],
    teachers: list[dict],
    data: dict,
    extra_files: list[str] = (),
    curves_file: str | None = None,
) -> None:
    """A human-readable account of what was distilled, how, and how well."""
    s = summary
    method = spec.get("method", {})
    hp = spec.get("hyperparameters", {})
    student = spec.get("student", {}).get("architecture", {})
    name = spec.get("name") or s.get("job_id") or "distilled model"
    lines = [f"# Model card: {name}", ""]

    if teachers:
        tnames = ", ".join(t["label"] for t in teachers)
        lines.append(
            f"A `{_arch_label(student)}` student distilled from {len(teachers)} teacher(s) ({tnames}) "
            f"with method `{method.get('type')}` on `{data['train']}`."
        )
    else:
        lines.append(
            f"A `{_arch_label(student)}` model trained `supervised` (no teacher) on `{data['train']}`."
        )
    lines += [
        "",
        f"- Job: `{s.get('job_id')}`",
        f"- Input: per-sample shape `{s.get('input_shape')}` ({s.get('input_dtype')}), {s.get('num_classes')} classes",
        f"- Training rows: {data['n_train']:,}; validation rows: {data['n_val']:,} ({data['validation']})",
        f"- Device: {s.get('device')}; epochs completed: {s.get('epochs_completed')}",
        "",
        "## Method and hyperparameters",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for k, v in method.items():
        lines.append(f"| method.{k} | `{json.dumps(v)}` |")
    for k, v in hp.items():
        lines.append(f"| {k} | `{json.dumps(v)}` |")
    lines.append(f"| augmentation | `{json.dumps(s.get('augmentation') or 'none')}` |")
    if s.get("teacher_outputs"):
        lines.append(f"| teacher_outputs | `{s['teacher_outputs']}` |")

    lines += [
        "",
        "## Results (validation split)",
        "",
        "| model | accuracy | parameters | size on disk | CPU latency / sample |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in teachers:
        lines.append(
            f"| teacher: {t['label']} | {_pct(t['accuracy'])} | {_num(t['params'])} | {_size(t['bytes'])} "
            f"| {_num(t['latency_ms'], '{:.4f} ms')} |"
        )
    lines.append(
        f"| **student**: {_arch_label(student)} | **{_pct(s.get('val_accuracy'))}** | {_num(s.get('student_params'))} "
        f"| {_size(s.get('student_bytes'))} | {_num(s.get('student_latency_ms'), '{:.4f} ms')} |"
    )
    if s.get("baseline_accuracy") is not None:
        lines.append(
            f"| baseline: same student, supervised, same budget | {_pct(s.get('baseline_accuracy'))} "
            f"| {_num(s.get('student_params'))} | {_size(s.get('student_bytes'))} "
            f"| {_num(s.get('student_latency_ms'), '{:.4f} ms')} |"
        )
    lines += [""]
    if teachers:
        lines += [
            f"- Student–teacher top-1 agreement: {_pct(s.get('agreement'))}",
            f"- Compression (teacher params / student params): {_num(s.get('compression_ratio'), '{:.2f}×')}",
            f"- Speed-up (teacher latency / student latency, CPU): {_num(s.get('speedup'), '{:.2f}×')}",
        ]
    if s.get("baseline_accuracy") is not None:
        lines.append(f"- KD gain over the supervised baseline: {_num(s.get('kd_gain'), '{:+.2f}')} points")
        lines.append(
            "- Teacher–baseline gap recovered: "
            + (
                _pct(s.get("gap_recovered"))
                if s.get("gap_recovered") is not None
                else "– (undefined: the teacher is not better than the baseline)"
            )
        )

    if data.get("report"):
        lines += _data_report_lines(data["report"])

    recipe = s.get("recipe")
    if recipe:
        lines += [
            "",
            "## Recipe search",
            "",
            (
                f"Searched {', '.join(f'`{k}`' for k in recipe['searched']) or 'nothing'} by successive halving on the "
                f"validation split: {recipe['spent_epochs']:g} of {recipe['budget_epochs']:g} full-data epochs spent on "
                f"{len(recipe['candidates'])} candidates. Chosen: `{json.dumps(recipe['chosen'])}`."
            ),
        ]
        if s.get("own_settings_baseline_accuracy") is not None:
            lines.append(
                f"The search changed the augmentation, so a second same-budget baseline kept the job's own "
                f"augmentation: {_pct(s['own_settings_baseline_accuracy'])}."
            )
        if recipe.get("shipped", "student") != "student":
            lines.append(
                f"No distillation setting beat the same-budget {recipe['shipped']} (distilled student "
                f"{_pct(recipe.get('distilled_val_accuracy'))}), so **the shipped model is the {recipe['shipped']}**."
            )
    if s.get("stages"):
        lines += [
            "",
            "## Stages",
            "",
            "The method trained a chain of models; each learned from the one before it.",
            "",
            "| stage | architecture | epochs | val accuracy | parameters |",
            "| --- | --- | --- | --- | --- |",
        ]
        for st in s["stages"]:
            lines.append(
                f"| {st['name']} | {_arch_label(st['architecture'])} | {st['epochs']} "
                f"| {_pct(st['val_accuracy'])} | {_num(st['params'])} |"
            )
    if s.get("method_metrics"):
        lines += ["", f"## Method metrics (`{method.get('type')}`)", ""]
        for key, value in s["method_metrics"].items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k}: {_pct(v) if isinstance(v, float) else v}" for k, v in value.items())
                lines.append(f"- {key}: {inner}")
            elif isinstance(value, float) and key.endswith("accuracy"):
                lines.append(f"- {key}: {_pct(value)}")
            elif isinstance(value, int) and key.endswith("bytes"):
                lines.append(f"- {key}: {_size(value)}")
            else:
                lines.append(f"- {key}: {value}")

    lines += [
        "",
        "## Training curve",
        "",
        *([f"![Loss terms and validation accuracy by epoch]({curves_file})", ""] if curves_file else []),
        "| epoch | train loss | val accuracy | agreement | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    shown = history if len(history) <= 20 else history[:5] + history[-15:]
    for i, row in enumerate(shown):
        if len(history) > 20 and i == 5:
            lines.append("| … | | | | |")
        lines.append(
            f"| {row['epoch']} | {row['train_loss']:.4f} | {_pct(row['val_accuracy'])} "
            f"| {_pct(row['teacher_agreement'])} | {row['seconds']:.2f} |"
        )

    phases = s.get("phases", {})
    lines += ["", "## Wall time by phase", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in phases.items()]

    lines += [
        "",
        "## Files",
        "",
        "- `model.safetensors`: the student's weights; its `__metadata__` holds the architecture, input shape,",
        "  class count and job id, so the model can be loaded (or used as a teacher via `from_job`).",
        (
            f"- `model.onnx`: opset {s.get('onnx_opset')}, input `x` `[batch, {', '.join(map(str, s.get('input_shape', [])))}]`,"
            " output `logits` `[batch, classes]`; dynamic batch."
        ),
        "- `metrics.json`: the summary above, per-epoch history and phase timings.",
        *(
            [f"- `{curves_file}`: per-epoch loss terms; validation accuracy of the student, the baseline"
             " (when trained) and the teacher(s)."]
            if curves_file else []
        ),  # fmt: skip
        *[
            f"- `{name}`: written by method `{method.get('type')}` (see its metrics above)."
            for name in extra_files
        ],
        "",
        "## Intended use and limitations",
        "",
        "- Intended for the same input distribution and label set as the training data above; accuracy is",
        "  measured on the validation split only and is not a guarantee on other data.",
        "- The student outputs logits; apply softmax for probabilities. It is not calibrated beyond what",
        "  training gave it, and it inherits the teacher's errors and biases along with its knowledge.",
        "- Latency was measured on the training machine's CPU with a small batch and is indicative only.",
        "",
    ]
    _atomic_text(Path(path), "\n".join(lines))


def _arch_label(architecture: dict) -> str:
    config = architecture.get("config") or {}
    inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    return f"{architecture.get('name')}({inner})"
