"""PyTorch distillation engine: pure torch/numpy, no database, queue or web framework.

The worker calls ``run_distillation(RunInputs(...), callbacks)``; see docs/engine.md.
"""

from .architectures import ARCHITECTURES, build_model, count_parameters
from .callbacks import Callback, CancelCallback, CheckpointCallback, ProgressCallback, TrainState
from .data import load_dataset, validate_data_file
from .errors import EngineError
from . import kernels  # noqa: F401  (the fused loss kernel; tests and the worker reach it as engine.kernels)
from .methods import METHODS, DistillationLoss, StepBatch

# Registering modules: each adds its methods to METHODS (hf: its architecture) on import.
from . import hf, methods_features, quantization, self_distill  # noqa: F401  isort: skip
from .run import RunInputs, RunResult, TeacherInput, run_distillation
from .runtime import available_cores, configure_threads
from .trainer import TrainConfig
from .weights import read_model_metadata

__all__ = [
    "ARCHITECTURES",
    "METHODS",
    "Callback",
    "CancelCallback",
    "CheckpointCallback",
    "DistillationLoss",
    "EngineError",
    "ProgressCallback",
    "RunInputs",
    "RunResult",
    "StepBatch",
    "TeacherInput",
    "TrainConfig",
    "TrainState",
    "available_cores",
    "build_model",
    "configure_threads",
    "count_parameters",
    "load_dataset",
    "read_model_metadata",
    "run_distillation",
    "validate_data_file",
]
