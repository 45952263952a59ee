"""``quantization``: quantisation-aware training of the student under a float teacher's KD.

Weights are fake-quantised symmetrically per output channel, the input of every
Linear/Conv1d/Conv2d per tensor (affine, from running min/max); rounding passes
gradients straight through (STE). After training the model is exported twice:
``model.safetensors`` / ``model.onnx`` hold the float architecture with the
fake-quantisation folded into the weights (every weight lies exactly on its
integer grid), and ``model_int{bits}.safetensors`` holds the integer weights with
their scales (see ``QUANTIZED_FORMAT`` and ``load_quantized``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import require
from .methods import (
    METHODS,
    KDLoss,
    check_temperature,
    check_unit,
)
from .trainer import accuracy, predict
from .weights import save_safetensors_atomic

QUANTIZED_FORMAT = "distill-quantized/1"
_EPS = 1e-8


# --------------------------------------------------------------------------- fake quantisation


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel scale s_c = max|w_c| / (2^(b−1) − 1), shaped to broadcast over w."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    return amax.clamp_min(_EPS) / qmax


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights q = clamp(round(w / s), −qmax, qmax) (int8) and the per-channel scales s (float32, [C_out])."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scale(w, bits)
    q = torch.clamp(torch.round(w.detach() / scale), -qmax, qmax).to(torch.int8)
    return q, scale.flatten().float()


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w → s·round(w / s) in the forward pass; identity gradient (straight-through estimator).

    The scale comes from the channel's own max |w|, so no weight is ever clipped and
    the STE gradient is exactly the identity.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scale(w, bits)
    dequant = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return w + (dequant - w).detach()


def fake_quant_activation(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor affine fake quantisation to [lo, hi] with 2^b levels (0 always representable).

    s = (hi − lo)/(2^b − 1), zp = round(−lo / s), q = clamp(round(x / s) + zp, 0, 2^b − 1),
    x̂ = (q − zp)·s. The gradient is the identity inside [lo, hi] and zero outside
    (clipped straight-through estimator).
    """
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(_EPS)
    zero_point = torch.round(-lo / scale)
    clipped = torch.clamp(x, lo, hi)
    q = torch.clamp(torch.round(clipped / scale) + zero_point, 0, levels)
    return clipped + ((q - zero_point) * scale - clipped).detach()


class ActivationQuantizer(nn.Module):
    """Running min/max of a layer's input (EMA while training) and its fake quantisation."""

    def __init__(self, bits: int, momentum: float = 0.1):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Branch-free on the buffers' values, so a CUDA step never waits for the host.
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().min().float(), x.detach().max().float()
                seen = self.initialized
                lo = torch.where(seen, self.min_val + self.momentum * (lo - self.min_val), lo)
                hi = torch.where(seen, self.max_val + self.momentum * (hi - self.max_val), hi)
                self.min_val.copy_(lo.clamp(max=0.0))
                self.max_val.copy_(hi.clamp(min=0.0))
                self.initialized.fill_(True)
        quantized = fake_quant_activation(x, self.min_val.to(x.dtype), self.max_val.to(x.dtype), self.bits)
        return torch.where(self.initialized, quantized, x)  # no range observed yet: pass-through

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) of the input quantisation, as an integer runtime would use them."""
        levels = 2**self.bits - 1
        scale = max((float(self.max_val) - float(self.min_val)) / levels, _EPS)
        return scale, round(-float(self.min_val) / scale)


class QuantLinear(nn.Linear):
    def forward(self, x):
        return F.linear(self.act(x), fake_quant_weight(self.weight, self.bits), self.bias)


class QuantConv1d(nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(self.act(x), fake_quant_weight(self.weight, self.bits), self.bias)


class QuantConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.act(x), fake_quant_weight(self.weight, self.bits), self.bias)


_QAT = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
_FLOAT = {v: k for k, v in _QAT.items()}


def prepare_qat(model: nn.Module, bits: int) -> nn.Module:
    """Make every Linear/Conv1d/Conv2d of ``model`` fake-quantised, in place.

    The modules keep their parameters (and so their state-dict keys and module
    paths); each gains an ``act`` input quantiser. No random numbers are drawn.
    """
    for module in model.modules():
        if type(module) in _QAT:
            module.__class__ = _QAT[type(module)]
            module.bits = bits
            module.act = ActivationQuantizer(bits)
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m) in _FLOAT}


def fold(model: nn.Module) -> nn.Module:
    """A plain float copy of a QAT model whose weights are the dequantised s·q (activations stay float)."""
    plain = copy.deepcopy(model)
    for module in quantized_layers(plain).values():
        q, scale = quantize_weight(module.weight, module.bits)
        with torch.no_grad():
            module.weight.copy_(q.float() * scale.view(-1, *[1] * (q.dim() - 1)))
        del module.act
        del module.bits
        module.__class__ = _FLOAT[type(module)]
    return plain


# --------------------------------------------------------------------------- the quantised artifact


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte: nibble = q + 8 (q in [−7, 7]), low nibble first, row-major order."""
    flat = (q.flatten().to(torch.int16) + 8).to(torch.uint8)
    if len(flat) % 2:
        flat = torch.cat([flat, torch.tensor([8], dtype=torch.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
    n = 1
    for d in shape:
        n *= d
    return (nibbles[:n].to(torch.int16) - 8).to(torch.int8).view(shape)


def _dequantize_text(bits: int) -> str:
    weight = (
        "L.weight is int8"
        if bits == 8
        else "L.weight is uint8 holding two 4-bit values per byte (low nibble first, row-major over the "
        "shape in weight_shapes[L]); value = nibble - 8, in [-7, 7]"
    )
    return (
        f"For every layer L in quantized_layers: {weight}; the float weight is value * L.weight_scale "
        "(float32, one scale per output channel, broadcast over the remaining dimensions). "
        "L.input_scale and L.input_zero_point (float32) are the per-tensor affine quantisation of the "
        f"layer's input used in training: q = clamp(round(x / s) + zp, 0, {2**bits - 1}), x = (q - zp) * s. "
        "Every other tensor is float32 and loads as it is. worker.engine.quantization.load_quantized "
        "returns the dequantised state dict of the architecture."
    )


def save_quantized(model: nn.Module, path: Path, metadata: dict, bits: int) -> None:
    """Write the integer weights, their scales, the input quantisation parameters and every float tensor."""
    layers = quantized_layers(model)
    tensors, shapes = {}, {}
    for key, value in model.state_dict().items():
        prefix = key.rsplit(".", 1)[0]
        if prefix in layers and key.endswith(".weight"):
            q, scale = quantize_weight(value, bits)
            shapes[prefix] = list(q.shape)
            tensors[key] = q if bits == 8 else _pack_int4(q)
            tensors[f"{prefix}.weight_scale"] = scale
        elif ".act." in key and any(key.startswith(p + ".act.") for p in layers):
            continue  # replaced by input_scale / input_zero_point below
        else:
            tensors[key] = value.detach().float() if value.is_floating_point() else value.detach()
    for prefix, layer in layers.items():
        scale, zero_point = layer.act.qparams()
        tensors[f"{prefix}.input_scale"] = torch.tensor([scale], dtype=torch.float32)
        tensors[f"{prefix}.input_zero_point"] = torch.tensor([float(zero_point)], dtype=torch.float32)
    header = {
        "format": json.dumps(QUANTIZED_FORMAT),
        "bits": json.dumps(bits),
        "quantized_layers": json.dumps(sorted(layers)),
        "weight_shapes": json.dumps(shapes),
        "dequantize": json.dumps(_dequantize_text(bits)),
    }
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    save_safetensors_atomic({k: v.to("cpu").contiguous() for k, v in tensors.items()}, Path(path), header)


def load_quantized(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The dequantised float state dict of the architecture, and the decoded metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    bits, shapes = meta["bits"], meta["weight_shapes"]
    state = {}
    for prefix in meta["quantized_layers"]:
        raw = tensors.pop(f"{prefix}.weight")
        q = raw if bits == 8 else _unpack_int4(raw, shapes[prefix])
        scale = tensors.pop(f"{prefix}.weight_scale")
        state[f"{prefix}.weight"] = q.float() * scale.view(-1, *[1] * (q.dim() - 1))
        tensors.pop(f"{prefix}.input_scale")
        tensors.pop(f"{prefix}.input_zero_point")
    state.update(tensors)
    return state, meta


# --------------------------------------------------------------------------- the method


@dataclass
class QuantizationConfig:
    bits: int = 8  # 8 or 4: weights (symmetric, per output channel) and layer inputs (affine, per tensor)
    temperature: float = 4.0  # softening temperature of the KD term
    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to label CE

    def __post_init__(self):
        require(self.bits in (4, 8), "invalid_spec", f"bits must be 8 or 4, got {self.bits}", "bits")
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")


@METHODS.register("quantization")
class QuantizationLoss(KDLoss):
    """Quantised distillation: quantisation-aware training of the student under a float
    teacher. Polino, Pascanu & Alistarh 2018, "Model Compression via Distillation and
    Quantization" (ICLR 2018, arXiv:1802.05668); Mishra & Marr 2018, "Apprentice: Using
    Knowledge Distillation Techniques to Improve Low-Precision Network Accuracy"
    (ICLR 2018, arXiv:1711.05852).

    L = (1 − α)·CE(ẑ_s, y) + α·T²·KL(p_t ‖ p̂_s)

    where ẑ_s are the logits of the student whose weights and layer inputs are
    fake-quantised in the forward pass: w ↦ s_c·clamp(round(w/s_c), ±(2^(b−1)−1)),
    s_c = max|w_c|/(2^(b−1)−1) per output channel; x ↦ affine per-tensor b-bit
    quantisation over the running [min, max] (EMA, momentum 0.1). Gradients pass
    straight through the rounding (identity; zero where an activation is clipped).

    Artifacts: ``model_int8.safetensors`` (``model_int4.safetensors`` for 4 bits) with
    the integer weights and per-channel scales (its metadata says how to dequantise);
    ``model.safetensors`` / ``model.onnx`` hold the float architecture with the
    quantised weights folded in. ``method_metrics``: ``quantized_accuracy`` (weights
    and inputs quantised, as trained; also the run's ``val_accuracy``),
    ``float_accuracy`` (the exported float model), ``quantized_bytes``,
    ``float_bytes``, ``bits``. Terms: ``kl``, ``ce`` when α < 1.
    """

    # The loss is KD's; the student's fake quantisation and the artifacts are what differ.
    Config = QuantizationConfig

    def wrap_student(self, student: nn.Module) -> nn.Module:
        return prepare_qat(student, self.config.bits)

    def export_model(self, student: nn.Module) -> nn.Module:
        return fold(student)

    def write_artifacts(self, student, out_dir, metadata, x, y, device):
        bits = self.config.bits
        path = Path(out_dir) / f"model_int{bits}.safetensors"
        save_quantized(student, path, metadata, bits)
        float_path = Path(out_dir) / "model.safetensors"
        metrics = {
            "bits": bits,
            "quantized_accuracy": accuracy(predict(student, x, device), y),
            "float_accuracy": accuracy(predict(fold(student), x, device), y),
            "quantized_bytes": path.stat().st_size,
            "float_bytes": float_path.stat().st_size if float_path.is_file() else None,
        }
        return {path.name: path}, metrics
