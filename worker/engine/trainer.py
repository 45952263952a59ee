"""The training loop. One loop for every method; it knows none of them by name.

Per step: take a batch by index, get teacher outputs (cached or fresh), run the
student, ask the method's loss module for ``(total, terms)``, step. Intermediate
outputs a method asked for (``loss_fn.student_taps`` / ``teacher_taps``) are
captured by forward hooks and travel in the ``StepBatch``. Per epoch: one host sync
for the loss sums, a non-finite check, validation, the epoch row, callbacks, and
the checkpoint if a callback asked for one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .augment import Pipeline, epoch_generator
from .callbacks import CallbackList, TrainState
from .config import require
from .errors import EngineError
from .features import FeatureTap
from .methods import DistillationLoss, StepBatch

CHECKPOINT_FORMAT = "distill-checkpoint/1"
_SPEC = "invalid_spec"


@dataclass
class TrainConfig:
    """``spec.hyperparameters``; defaults match the API's."""

    epochs: int = 30  # passes over the training rows
    batch_size: int = 128  # rows per optimizer step
    learning_rate: float = 0.003  # peak learning rate
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0  # L2 penalty (adam, sgd) or decoupled decay (adamw)
    momentum: float = 0.9  # sgd only (Nesterov off)
    scheduler: str = "cosine"  # cosine (per step, down to 0) | constant
    seed: int = 0  # student init, shuffling, dropout and the validation split
    validation_fraction: float = 0.1  # rows held out of train when there is no validation file
    baseline: bool = False  # also train the student supervised with the same budget
    max_grad_norm: float | None = None  # clip the global gradient norm; None = no clipping

    def __post_init__(self):
        require(self.epochs >= 1, _SPEC, f"epochs must be >= 1, got {self.epochs}", "epochs")
        require(self.batch_size >= 1, _SPEC, f"batch_size must be >= 1, got {self.batch_size}", "batch_size")
        require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            _SPEC,
            f"learning_rate must be a positive number, got {self.learning_rate}",
            "learning_rate",
        )
        require(
            self.optimizer in OPTIMIZERS,
            _SPEC,
            f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}",
            "optimizer",
        )
        require(
            self.scheduler in SCHEDULERS,
            _SPEC,
            f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}",
            "scheduler",
        )
        require(
            self.weight_decay >= 0,
            _SPEC,
            f"weight_decay must be >= 0, got {self.weight_decay}",
            "weight_decay",
        )
        require(0 <= self.momentum < 1, _SPEC, f"momentum must be in [0, 1), got {self.momentum}", "momentum")
        require(self.seed >= 0, _SPEC, f"seed must be >= 0, got {self.seed}", "seed")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            _SPEC,
            f"max_grad_norm must be positive or null, got {self.max_grad_norm}",
            "max_grad_norm",
        )


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "constant")


@dataclass
class Split:
    """One data split, as tensors ready for indexing (on the device when they fit).

    Any of the row arrays may instead be a ``mapped.MappedRows`` (data larger than
    memory, read a batch at a time); ``fetch`` hides the difference from the loop.
    """

    x: torch.Tensor  # student input, already in the student's input dtype
    y: torch.Tensor | None  # int64 class ids
    teacher_x: list[torch.Tensor] = field(
        default_factory=list
    )  # per teacher, in its input dtype (often x itself)
    teacher_logits: list[torch.Tensor] = field(
        default_factory=list
    )  # per teacher, precomputed (empty = run fresh)
    teacher_features: list[dict[str, torch.Tensor]] = field(
        default_factory=list
    )  # per teacher, precomputed tapped outputs (fp16), present whenever teacher_logits is

    def __len__(self) -> int:
        return len(self.x)


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer, with torch's fused kernel where the parameters allow it.

    The fused implementation updates every parameter in one kernel per step; on a small
    student its per-tensor loop was a third of the step's time.
    """
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if config.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused
        )
    return torch.optim.SGD(
        params,
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        fused=fused,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.scheduler == "cosine":

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    else:

        def factor(step: int) -> float:
            return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch.

    A generator seeded from (seed, epoch) rather than a running one means a resumed
    run needs no generator state to reproduce the order. A trailing one-row batch
    is folded into the previous one because BatchNorm cannot train on one row.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).to(device)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def fetch(rows, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of ``rows`` (a tensor, or mapped rows on the host) as a tensor on ``device``.

    Data already on the accelerator is indexed there. Host data bound for CUDA is
    gathered into page-locked memory (from torch's caching host allocator, which keeps
    a block until the copy that reads it has finished) and copied with
    ``non_blocking=True``, so the copy overlaps the GPU's work and the host goes on to
    the next batch. On CPU it is one index operation.
    """
    if isinstance(rows, torch.Tensor) and (rows.device.type != "cpu" or device.type == "cpu"):
        return torch.index_select(rows, 0, idx)  # a plain gather: cheaper per call than rows[idx]
    if rows.device.type != "cpu" or device.type == "cpu":
        return rows[idx]
    if device.type != "cuda":
        return rows[idx].to(device)
    if isinstance(rows, torch.Tensor):
        staged = torch.empty((len(idx), *rows.shape[1:]), dtype=rows.dtype, pin_memory=True)
        torch.index_select(rows, 0, idx, out=staged)
    else:
        staged = rows[idx].pin_memory()
    return staged.to(device, non_blocking=True)


SOFT_TARGET_BYTES = 1 << 30  # precomputed soft targets (float32) larger than this are formed per step


def precompute_soft_targets(
    loss_fn: DistillationLoss, train: Split, teacher_weights: list[float], chunk: int = 8192
) -> torch.Tensor | None:
    """``loss_fn.soft_targets`` for every training row from the cached teacher logits, or None.

    None when the loss reads raw teacher outputs, the cache is memory-mapped, or the
    result would exceed ``SOFT_TARGET_BYTES``; the step then forms them per batch.
    Computed where the cache lives, chunk by chunk.
    """
    cached = train.teacher_logits
    if any(not isinstance(c, torch.Tensor) for c in cached):
        return None
    n, k = cached[0].shape
    if n * k * 4 > SOFT_TARGET_BYTES:
        return None
    parts = []
    with torch.inference_mode():
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            y = train.y[rows].to(cached[0].device) if train.y is not None else None
            part = loss_fn.soft_targets([c[rows].float() for c in cached], teacher_weights, y)
            if part is None:
                return None
            parts.append(part.float())
    return torch.cat(parts)  # made out of inference mode: a normal tensor the loss may use in recorded ops


def steps_per_epoch(n: int, batch_size: int) -> int:
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and n % batch_size == 1 else steps


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Logits for all rows (float32, on ``device``), in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    out = [
        model(x[i : i + batch_size].to(device, non_blocking=True)).float()
        for i in range(0, len(x), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor | None) -> float | None:
    if y is None or len(y) == 0:
        return None
    return (logits.argmax(-1) == y.to(logits.device)).float().mean().item()


def autocast_enabled(device: torch.device, autocast: bool | None = None) -> bool:
    """Whether the student forward runs under bf16 autocast.

    ``None`` (automatic): on CUDA devices that support bf16, never on CPU (CPU bf16 is
    slow). ``True`` forces it on (where the device has no bf16 this is an error from
    torch), ``False`` off.
    """
    if autocast is None:
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(autocast)


def autocast_for(device: torch.device, autocast: bool | None = None):
    if autocast_enabled(device, autocast):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    *,
    student: nn.Module,
    loss_fn: DistillationLoss,
    teachers: list[nn.Module],
    teacher_weights: list[float],
    train: Split,
    val: Split,
    val_reference: torch.Tensor | None,
    config: TrainConfig,
    state: TrainState,
    callbacks: CallbackList,
    device: torch.device,
    checkpoint_path: Path | None = None,
    resume: dict | None = None,
    checkpoint_extra: dict | None = None,
    autocast: bool | None = None,
    augmentation: Pipeline | None = None,
    views: list[Split] | None = None,
) -> None:
    """Train ``student`` in place. Sets ``state.cancelled`` if a callback stopped it.

    ``val_reference`` holds the (fused) teacher's validation predictions for the
    agreement metric. ``resume`` is a checkpoint dict from ``load_checkpoint``.
    ``checkpoint_extra`` is merged into every checkpoint (the runner's stage bookkeeping).
    ``autocast``: bf16 autocast of the student and fresh teacher forwards, None = automatic.
    ``augmentation``: applied to every batch; the teachers then run on the augmented batch.
    ``views``: a teacher-output pool (``augment.build_pool``): epoch e trains on view e mod K,
    rows already augmented and scored, so ``augmentation`` is not applied again.
    """
    # ---- setup: optimizer, schedule, state -------------------------------------------------
    params = [p for p in itertools.chain(student.parameters(), loss_fn.parameters()) if p.requires_grad]
    optimizer = make_optimizer(params, config)
    n = len(train)
    state.epochs = config.epochs
    state.steps_per_epoch = steps_per_epoch(n, config.batch_size)
    scheduler = make_scheduler(optimizer, config, total_steps=state.steps_per_epoch * config.epochs)
    state.epoch, state.step_in_epoch, state.global_step, state.history = 0, 0, 0, []
    use_cache = len(train.teacher_logits) > 0 or bool(views)
    augment = augmentation if augmentation and not views else None
    # A loss that distils toward a per-row distribution gets it computed once, for every row.
    soft_targets = (
        precompute_soft_targets(loss_fn, train, teacher_weights) if use_cache and not views else None
    )

    # ---- resume: continue after the last completed epoch ------------------------------------
    if resume is not None:
        student.load_state_dict(resume["student"])
        loss_fn.load_state_dict(resume["loss"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        # Restoring RNG last: nothing between here and the first step may draw random numbers.
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and resume["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        state.epoch = min(int(resume["epoch"]), config.epochs)
        state.global_step = state.epoch * state.steps_per_epoch
        state.history = list(resume["history"])[: state.epoch]

    callbacks.on_train_begin(state)
    if state.should_stop:  # cancelled before the first step
        state.cancelled = True
        return

    # ---- hooks: intermediate outputs the method asked for (none for output-only methods) ---
    with FeatureTap(student, loss_fn.student_taps) as student_tap, contextlib.ExitStack() as hooks:
        teacher_taps = [hooks.enter_context(FeatureTap(t, loss_fn.teacher_taps)) for t in teachers]

        # ---- epochs ------------------------------------------------------------------------
        while state.epoch < config.epochs:
            epoch = state.epoch
            started = time.perf_counter()
            student.train()
            loss_fn.train()
            sums: torch.Tensor | None = None  # [total, *terms], row-weighted, on the device

            split = train
            if views:  # this epoch's pool view: augmented rows with their teacher outputs
                split = views[epoch % len(views)]
                soft_targets = precompute_soft_targets(loss_fn, split, teacher_weights)
            generator = epoch_generator(config.seed, epoch, device) if augment else None

            for step, idx in enumerate(
                epoch_batches(n, config.batch_size, config.seed, epoch, split.x.device)
            ):
                # -- batch: index contiguous tensors (or mapped rows); no DataLoader workers to start
                xb = fetch(split.x, idx, device)
                yb = fetch(split.y, idx, device) if split.y is not None else None
                if augment:  # the student's batch; the teachers below score exactly this one
                    xb, yb = augment(xb, yb, generator)

                # -- teacher targets: the per-run cache, or a fresh frozen forward
                soft = None
                if soft_targets is not None:
                    soft = fetch(soft_targets, idx, device)
                    teacher_logits = []
                    teacher_features = [
                        {k: fetch(v, idx, device).float() for k, v in f.items()}
                        for f in split.teacher_features
                    ]
                elif use_cache:
                    teacher_logits = [fetch(c, idx, device).float() for c in split.teacher_logits]
                    teacher_features = [
                        {k: fetch(v, idx, device).float() for k, v in f.items()}
                        for f in split.teacher_features
                    ]
                else:
                    with torch.inference_mode(), autocast_for(device, autocast):
                        fresh = [
                            t(xb.to(tx.dtype) if augment else fetch(tx, idx, device)).float()
                            for t, tx in zip(teachers, train.teacher_x)
                        ]
                        fresh_features = [tap.take() for tap in teacher_taps]
                    # Out of inference mode, so the loss may use them in autograd-recorded ops.
                    teacher_logits = [f.clone() for f in fresh]
                    teacher_features = [{k: v.clone() for k, v in f.items()} for f in fresh_features]

                # -- forward: student (hooks capture its tapped outputs), then the method's loss
                with autocast_for(device, autocast):
                    logits = student(xb)
                batch = StepBatch(
                    logits.float(),
                    yb,
                    teacher_logits,
                    teacher_weights,
                    xb,
                    epoch,
                    student_features=student_tap.take(),
                    teacher_features=teacher_features,
                    soft_targets=soft,
                )
                loss, terms = loss_fn(batch)

                # -- backward and update
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()

                # -- bookkeeping on device: an .item() here would sync the host every step
                values = torch.stack([loss.detach(), *terms.values()])
                sums = values * len(idx) if sums is None else sums.add_(values, alpha=len(idx))
                state.step_in_epoch = step + 1
                state.global_step += 1
                if step % 100 == 99 and not torch.isfinite(sums[0]):
                    raise _non_finite(epoch, step)  # a cheap, rare check so a diverged long epoch ends early
                callbacks.on_step_end(state)
                if state.should_stop:
                    state.cancelled = True
                    return

            # ---- epoch end: one host sync, validation, the metrics row -----------------------
            names = list(terms)
            sums = sums.div(n).tolist()
            if not all(math.isfinite(v) for v in sums):
                raise _non_finite(epoch, None)
            val_logits = predict(student, val.x, device)
            row = {
                "phase": state.phase,  # "train" or "baseline": both number their epochs from 1
                "epoch": epoch + 1,
                "train_loss": sums[0],
                "losses": dict(zip(names, sums[1:])),
                "val_accuracy": accuracy(val_logits, val.y),
                "teacher_agreement": agreement(val_logits, val_reference),
                "learning_rate": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - started,
            }
            method_metrics = loss_fn.validation_metrics(student, val.x, val.y, device)
            if method_metrics:  # e.g. every self-distillation exit's accuracy
                row["method_metrics"] = method_metrics
            student_tap.clear()  # drop what the hooks saw during validation
            state.history.append(row)
            state.epoch = epoch + 1
            state.step_in_epoch = 0
            callbacks.on_epoch_end(state)

            # ---- checkpoint, only when a callback asked for it ------------------------------
            if state.should_checkpoint and checkpoint_path is not None:
                save_checkpoint(
                    checkpoint_path,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "job_id": state.job_id,
                        "epoch": state.epoch,
                        "student": student.state_dict(),
                        "loss": loss_fn.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": {
                            "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                        },
                        "history": state.history,
                        **(checkpoint_extra or {}),
                    },
                )
                callbacks.on_checkpoint(state, checkpoint_path)
            state.should_checkpoint = False
            if state.should_stop:
                state.cancelled = True
                return

    callbacks.on_train_end(state)


def agreement(logits: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    """Top-1 agreement between ``logits`` and reference predictions (class ids)."""
    if reference is None:
        return None
    return (logits.argmax(-1) == reference.to(logits.device)).float().mean().item()


def _non_finite(epoch: int, step: int | None) -> EngineError:
    where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
    return EngineError(
        "non_finite_loss",
        f"the training loss became NaN or infinite in {where}; lower learning_rate, set max_grad_norm, "
        "or check the data for inf/NaN values",
        param="hyperparameters.learning_rate",
    )


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic write: temp file in the same folder, fsync, rename over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by ``save_checkpoint``: tensors and plain containers only."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{Path(path).name} is not a {CHECKPOINT_FORMAT} checkpoint")
    return payload
