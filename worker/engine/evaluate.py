"""Model measurements for the job's metrics (design section 7)."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn


def cpu_latency_ms(model: nn.Module, sample: torch.Tensor, repeats: int = 5) -> float:
    """Median CPU milliseconds per sample over ``repeats`` timed forwards of ``sample``.

    Measured on CPU whatever the training device, because that is where a distilled
    model is usually deployed; one untimed warm-up pass absorbs allocator and
    kernel-selection costs. Uses the process's thread settings as they are.
    """
    on_cpu = all(t.device.type == "cpu" for t in _tensors(model))
    m = model if on_cpu else copy.deepcopy(model).to("cpu")
    was_training = m.training
    m.eval()
    sample = sample.to("cpu")
    times = []
    with torch.inference_mode():
        m(sample)
        for _ in range(repeats):
            start = time.perf_counter()
            m(sample)
            times.append(time.perf_counter() - start)
    m.train(was_training)
    return statistics.median(times) * 1000.0 / len(sample)


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def fused_predictions(logits: list[torch.Tensor], weights: list[float]) -> torch.Tensor | None:
    """Class ids of the weighted mean of teacher probabilities (T = 1); one teacher = its argmax."""
    if not logits:
        return None
    if len(logits) == 1:
        return logits[0].argmax(-1)
    total = float(sum(weights)) or 1.0
    probs = sum(w / total * l.float().softmax(-1) for w, l in zip(weights, logits))
    return probs.argmax(-1)
