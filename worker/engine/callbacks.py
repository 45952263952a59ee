"""Training state and callbacks (progress, cancellation, checkpointing).

Callbacks observe the ``TrainState`` and may set its flags (``should_stop``,
``should_checkpoint``); the trainer alone acts on the flags. This keeps the loop
in charge of ordering (e.g. a checkpoint is written only at an epoch boundary,
atomically) while the worker plugs in its DB writes and cancel polling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """What the loop exposes to callbacks. Epoch counts are *completed* epochs."""

    job_id: str = ""  # the job being run
    phase: str = "load"  # load | teacher_cache | train | baseline | export | done, or a chain's
    # intermediate stage while it trains (e.g. assistant_1, generation_1; the last stage is "train")
    epoch: int = 0  # epochs completed in the current phase
    epochs: int = 0  # epochs planned for the current phase
    step_in_epoch: int = 0  # optimizer steps done in the running epoch
    steps_per_epoch: int = 0  # optimizer steps per epoch
    global_step: int = 0  # optimizer steps done in the current phase
    history: list[dict] = field(default_factory=list)  # per-epoch metric rows of the current phase
    # Overall progress = progress_start + progress_span * (fraction of the current phase),
    # so a run with a baseline reports one monotone 0..1 fraction over both trainings.
    progress_start: float = 0.0
    progress_span: float = 1.0
    should_stop: bool = False  # set by callbacks (cancel); the loop stops after the current step
    should_checkpoint: bool = False  # set by callbacks at epoch end; the loop writes the checkpoint
    cancelled: bool = False  # set by the loop once it has stopped because of should_stop

    @property
    def phase_fraction(self) -> float:
        if self.epochs <= 0:
            return 0.0
        within = self.step_in_epoch / self.steps_per_epoch if self.steps_per_epoch else 0.0
        return min(1.0, (self.epoch + within) / self.epochs)

    @property
    def fraction(self) -> float:
        return min(1.0, self.progress_start + self.progress_span * self.phase_fraction)


class Callback:
    """Base class; every hook is a no-op. Hooks must be cheap: they run in the loop."""

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState) -> None:
        pass

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        pass

    def on_log(self, state: TrainState, level: str, message: str, data: dict) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class CallbackList:
    """Fans each event out to every callback, in order."""

    def __init__(self, callbacks: list[Callback] | None):
        self.callbacks = list(callbacks or [])

    def __getattr__(self, event: str) -> Callable[..., None]:
        if not event.startswith("on_"):
            raise AttributeError(event)

        def fire(*args: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, event)(*args)

        return fire


class ProgressCallback(Callback):
    """Reports ``{"epoch", "epochs", "fraction", "phase", "metrics"}`` through ``report``.

    Throttled to one call per ``min_interval_s`` during steps (a DB write per step
    would dominate small epochs), and always called at epoch end and train end.
    ``metrics`` is the latest epoch row, or None before the first epoch ends.
    """

    def __init__(self, report: Callable[[dict], None], min_interval_s: float = 1.0):
        self.report = report
        self.min_interval_s = min_interval_s
        self._last = float("-inf")

    def _send(self, state: TrainState) -> None:
        self._last = time.monotonic()
        self.report(
            {
                "epoch": state.epoch,
                "epochs": state.epochs,
                "fraction": round(state.fraction, 6),
                "phase": state.phase,
                "metrics": state.history[-1] if state.history else None,
            }
        )

    def on_train_begin(self, state):
        self._send(state)

    def on_step_end(self, state):
        if time.monotonic() - self._last >= self.min_interval_s:
            self._send(state)

    def on_epoch_end(self, state):
        self._send(state)

    def on_train_end(self, state):
        self._send(state)


class CancelCallback(Callback):
    """Polls ``is_cancelled`` (e.g. a DB flag) at most once per ``min_interval_s``; sets ``should_stop``."""

    def __init__(self, is_cancelled: Callable[[], bool], min_interval_s: float = 1.0):
        self.is_cancelled = is_cancelled
        self.min_interval_s = min_interval_s
        self._last = float("-inf")

    def _poll(self, state: TrainState) -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return
        self._last = now
        if self.is_cancelled():
            state.should_stop = True

    def on_train_begin(self, state):
        self._poll(state)

    def on_step_end(self, state):
        self._poll(state)

    def on_epoch_end(self, state):
        self._poll(state)


class CheckpointCallback(Callback):
    """Asks for a checkpoint every ``every_epochs`` epochs (and after the last one).

    The trainer writes ``output_dir/checkpoint.pt`` atomically and then calls
    ``on_checkpoint(state, path)`` on all callbacks, which is where a worker copies
    the file to durable storage.
    """

    def __init__(self, every_epochs: int = 1):
        if every_epochs < 1:
            raise ValueError("every_epochs must be >= 1")
        self.every_epochs = every_epochs

    def on_epoch_end(self, state):
        if state.epoch % self.every_epochs == 0 or state.epoch == state.epochs:
            state.should_checkpoint = True
