"""Model architectures, registered by name with a typed config.

Every model is a ``Classifier``: ``forward_features`` maps an input batch to an
embedding ``[B, D]`` and ``head`` maps that to logits ``[B, num_classes]``. The split
is what later feature/relation methods hook into. Input shape (per sample, no batch
dim) and class count come from the data, never from the user, so a spec only says
what it wants to vary. Every model avoids data-dependent control flow so that
``torch.onnx.export`` produces a graph with a dynamic batch dimension.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import parse_config, require
from .errors import EngineError
from .registry import Registry

ARCHITECTURES: Registry[type[Classifier]] = Registry(
    "architecture", "invalid_architecture", "architecture.name"
)

_CODE = "invalid_architecture"


class Classifier(nn.Module):
    """Base class: embedding network + linear head.

    Every architecture names its final ``nn.Linear`` ``head``; its input is the
    penultimate embedding (the ``embedding`` tap of ``features.py``). ``stage_paths``
    lists the module paths whose outputs end the intermediate stages (shallow to
    deep, the last stage excluded), where self-distillation attaches its exits.
    """

    Config: ClassVar[type]
    # dtype the model's input must have; token models take int64 ids.
    input_dtype: torch.dtype = torch.float32
    # True where 3-D activations are [B, L, C] (so feature taps transpose them to [B, C, L]).
    sequence_channels_last: ClassVar[bool] = False

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.stage_paths: list[str] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # ---- hooks with plain defaults; an architecture built from other files (``hf.py``) overrides them

    @classmethod
    def load(cls, architecture, path, input_shape, num_classes, *, who, param, param_prefix) -> Classifier:
        """A teacher from its weights file: build the architecture, load the safetensors strictly."""
        from .weights import load_weights_strict

        model = build_model(architecture, input_shape, num_classes, param_prefix=param_prefix)
        load_weights_strict(model, path, who=who, param=param)
        return model

    @classmethod
    def resolve(cls, architecture: dict, teachers: list, param_prefix: str) -> dict:
        """The architecture as it will be built; one may take settings from the job's teachers."""
        return architecture

    def initialise_from(self, teachers: list) -> dict | None:
        """Copy what the architecture takes from the teachers into a fresh model; what was copied, or None."""
        return None

    def export_files(self, out_dir) -> dict:
        """Extra artifacts in the architecture's own format (name -> path)."""
        return {}


def build_model(
    architecture: dict, input_shape: tuple, num_classes: int, *, param_prefix: str = "architecture"
) -> Classifier:
    """Build a freshly initialised model from ``{"name": ..., "config": {...}}``.

    ``param_prefix`` locates the architecture in the job spec (e.g. ``student.architecture``)
    so that errors point at the right place.
    """
    if not isinstance(architecture, dict):
        raise EngineError(
            _CODE, f"{param_prefix} must be an object with 'name' and 'config'", param=param_prefix
        )
    extra = sorted(set(architecture) - {"name", "config"})
    if extra:
        raise EngineError(
            _CODE,
            f"unknown key {extra[0]!r} in {param_prefix}; valid keys: name, config",
            param=f"{param_prefix}.{extra[0]}",
        )
    name = architecture.get("name")
    try:
        cls = ARCHITECTURES.get(name)
    except EngineError as err:
        err.param = f"{param_prefix}.name"
        raise
    config = parse_config(cls.Config, architecture.get("config"), code=_CODE, prefix=f"{param_prefix}.config")
    require(num_classes >= 2, _CODE, f"need at least 2 classes, the data has {num_classes}", param_prefix)
    try:
        model = cls(config, tuple(int(d) for d in input_shape), int(num_classes))
    except EngineError as err:
        # Constructors name the field only; qualify it with where the architecture sits in the spec.
        err.param = (
            f"{param_prefix}.name" if err.param in (None, "name") else f"{param_prefix}.config.{err.param}"
        )
        raise
    # The normalised architecture (all defaults filled) travels with the weights' metadata,
    # so a later job rebuilds exactly this model even if defaults change.
    model.architecture = {"name": name, "config": dataclasses.asdict(config)}
    return model


def _registered(architecture, param_prefix: str) -> type[Classifier] | None:
    name = architecture.get("name") if isinstance(architecture, dict) else None
    try:
        return ARCHITECTURES.get(name)
    except EngineError as err:
        err.param = f"{param_prefix}.name"
        raise


def load_model(
    architecture: dict, path, input_shape: tuple, num_classes: int, *, who: str, param: str, param_prefix: str
) -> Classifier:
    """A teacher: its architecture built and its weights loaded (the architecture decides how)."""
    cls = _registered(architecture, param_prefix)
    return cls.load(architecture, path, input_shape, num_classes, who=who, param=param, param_prefix=param_prefix)


def build_student(
    architecture: dict, input_shape: tuple, num_classes: int, teachers: list, *, param_prefix: str, log=None
) -> Classifier:
    """``build_model`` for a model that may derive from the job's teachers: its config resolved from
    theirs, its initial weights copied from theirs (``log`` hears what was copied)."""
    if isinstance(architecture, dict) and architecture.get("name") in ARCHITECTURES:
        architecture = ARCHITECTURES.get(architecture["name"]).resolve(architecture, teachers, param_prefix)
    model = build_model(architecture, input_shape, num_classes, param_prefix=param_prefix)
    copied = model.initialise_from(teachers)
    if copied is not None and log is not None:
        log("info", "student initialised from teacher", **copied)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _positive(value: float, name: str) -> None:
    require(value > 0, _CODE, f"{name} must be positive, got {value}", name)


def _probability(value: float, name: str) -> None:
    require(0.0 <= value < 1.0, _CODE, f"{name} must be in [0, 1), got {value}", name)


def _shape_error(arch: str, input_shape: tuple, accepted: str) -> EngineError:
    return EngineError(
        _CODE,
        f"architecture {arch!r} cannot read inputs of per-sample shape {list(input_shape)}; it accepts {accepted}",
        param="name",
    )


# --------------------------------------------------------------------------- mlp


@dataclass
class MLPConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])  # width of each hidden layer
    dropout: float = 0.0  # dropout after each hidden activation

    def __post_init__(self):
        for i, h in enumerate(self.hidden_sizes):
            _positive(h, f"hidden_sizes[{i}]")
        _probability(self.dropout, "dropout")


@ARCHITECTURES.register("mlp")
class MLP(Classifier):
    """Fully connected ReLU network over the flattened input (any input shape)."""

    Config = MLPConfig

    def __init__(self, config: MLPConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, num_classes)
        width = math.prod(input_shape)
        layers: list[nn.Module] = []
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            self.stage_paths.append(f"net.{len(layers) - 1}")
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        self.net = nn.Sequential(*layers)
        self.stage_paths = self.stage_paths[:-1]
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.net(x.flatten(1))


# --------------------------------------------------------------------------- cnn1d


@dataclass
class CNN1dConfig:
    channels: int = 64  # filters in every conv layer
    num_layers: int = 3  # conv layers; each after the first halves the length
    kernel_size: int = 5  # odd kernel keeps 'same' padding symmetric
    dropout: float = 0.0  # dropout before the head

    def __post_init__(self):
        _positive(self.channels, "channels")
        _positive(self.num_layers, "num_layers")
        _positive(self.kernel_size, "kernel_size")
        require(
            self.kernel_size % 2 == 1,
            _CODE,
            f"kernel_size must be odd, got {self.kernel_size}",
            "kernel_size",
        )
        _probability(self.dropout, "dropout")


@ARCHITECTURES.register("cnn1d")
class CNN1d(Classifier):
    """Conv1d-BN-ReLU stack for sequences ``[N, L]`` or ``[N, C, L]``; flattened into the head.

    Flattening (rather than global pooling) keeps position information, which
    matters for signals like MNIST-1D where *where* a bump is tells the class.
    """

    Config = CNN1dConfig

    def __init__(self, config: CNN1dConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, num_classes)
        if len(input_shape) == 1:
            in_channels, length = 1, input_shape[0]
        elif len(input_shape) == 2:
            in_channels, length = input_shape
        else:
            raise _shape_error("cnn1d", input_shape, "[L] or [C, L]")
        layers: list[nn.Module] = []
        for i in range(config.num_layers):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv1d(
                    in_channels,
                    config.channels,
                    config.kernel_size,
                    stride=stride,
                    padding=config.kernel_size // 2,
                    bias=False,
                ),
                nn.BatchNorm1d(config.channels),
                nn.ReLU(),
            ]
            self.stage_paths.append(f"net.{len(layers) - 1}")
            in_channels = config.channels
            length = (length + 2 * (config.kernel_size // 2) - config.kernel_size) // stride + 1
            require(
                length >= 1,
                _CODE,
                f"num_layers={config.num_layers} downsamples the input to nothing",
                "num_layers",
            )
        self.net = nn.Sequential(*layers)
        self.stage_paths = self.stage_paths[:-1]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.head = nn.Linear(config.channels * length, num_classes)
        self._unsqueeze = len(input_shape) == 1

    def forward_features(self, x):
        if self._unsqueeze:
            x = x.unsqueeze(1)
        return self.dropout(self.net(x).flatten(1))


# --------------------------------------------------------------------------- cnn2d


@dataclass
class CNN2dConfig:
    channels: list[int] = field(
        default_factory=lambda: [32, 64]
    )  # filters per stage; each stage halves H and W
    kernel_size: int = 3  # odd conv kernel size
    dropout: float = 0.0  # dropout before the head

    def __post_init__(self):
        require(len(self.channels) >= 1, _CODE, "channels must list at least one stage", "channels")
        for i, c in enumerate(self.channels):
            _positive(c, f"channels[{i}]")
        _positive(self.kernel_size, "kernel_size")
        require(
            self.kernel_size % 2 == 1,
            _CODE,
            f"kernel_size must be odd, got {self.kernel_size}",
            "kernel_size",
        )
        _probability(self.dropout, "dropout")


@ARCHITECTURES.register("cnn2d")
class CNN2d(Classifier):
    """Stages of Conv2d-BN-ReLU + 2x2 max-pool over images ``[N, C, H, W]`` (or ``[N, H, W]``), then global average pool."""

    Config = CNN2dConfig

    def __init__(self, config: CNN2dConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, num_classes)
        if len(input_shape) == 2:
            in_channels, h, w = 1, *input_shape
        elif len(input_shape) == 3:
            in_channels, h, w = input_shape
        else:
            raise _shape_error("cnn2d", input_shape, "[C, H, W] or [H, W]")
        layers: list[nn.Module] = []
        for c in config.channels:
            layers += [
                nn.Conv2d(in_channels, c, config.kernel_size, padding=config.kernel_size // 2, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            ]
            # Pool only while there is something to pool, so small images still work.
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self.stage_paths.append(f"net.{len(layers) - 1}")
            in_channels = c
        self.net = nn.Sequential(*layers)
        self.stage_paths = self.stage_paths[:-1]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.head = nn.Linear(in_channels, num_classes)
        self._unsqueeze = len(input_shape) == 2

    def forward_features(self, x):
        if self._unsqueeze:
            x = x.unsqueeze(1)
        return self.dropout(self.net(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- resnet_cifar


@dataclass
class ResNetCifarConfig:
    depth: int = 20  # 6n+2: 8, 14, 20, 32, 44, 56, 110
    width: int = 1  # multiplies the 16/32/64 stage widths (resnet8x4 = depth 8, width 4)

    def __post_init__(self):
        require(
            self.depth >= 8 and (self.depth - 2) % 6 == 0,
            _CODE,
            f"depth must be 6n+2 (8, 14, 20, 32, ...), got {self.depth}",
            "depth",
        )
        _positive(self.width, "width")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # A 1x1 projection only where the shape changes (He et al. option B).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@ARCHITECTURES.register("resnet_cifar")
class ResNetCifar(Classifier):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): 3 stages of (depth-2)/6 basic blocks."""

    Config = ResNetCifarConfig

    def __init__(self, config: ResNetCifarConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, num_classes)
        if len(input_shape) == 2:
            in_channels = 1
        elif len(input_shape) == 3:
            in_channels = input_shape[0]
        else:
            raise _shape_error("resnet_cifar", input_shape, "[C, H, W] or [H, W]")
        n = (config.depth - 2) // 6
        widths = [16 * config.width, 32 * config.width, 64 * config.width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        planes = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes, w, stride=2 if (i > 0 and j == 0) else 1))
                planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.stage_paths = ["layer1", "layer2"]
        self.head = nn.Linear(planes, num_classes)
        self._unsqueeze = len(input_shape) == 2

    def forward_features(self, x):
        if self._unsqueeze:
            x = x.unsqueeze(1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------- transformer


@dataclass
class TransformerConfig:
    d_model: int = 64  # embedding width
    n_heads: int = 4  # attention heads; must divide d_model
    n_layers: int = 2  # pre-LN encoder blocks
    dim_feedforward: int | None = None  # MLP hidden width; None means 4 * d_model
    dropout: float = 0.0  # dropout on attention weights and residual branches
    vocab_size: int | None = None  # set for int token-id inputs; None for float sequences

    def __post_init__(self):
        _positive(self.d_model, "d_model")
        _positive(self.n_heads, "n_heads")
        _positive(self.n_layers, "n_layers")
        require(
            self.d_model % self.n_heads == 0,
            _CODE,
            f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})",
            "n_heads",
        )
        if self.dim_feedforward is not None:
            _positive(self.dim_feedforward, "dim_feedforward")
        if self.vocab_size is not None:
            _positive(self.vocab_size, "vocab_size")
        _probability(self.dropout, "dropout")


class SelfAttention(nn.Module):
    """Multi-head self-attention written out, so the ONNX graph is plain MatMul/Softmax."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, length, d = x.shape
        head_dim = d // self.n_heads
        q, k, v = self.qkv(x).reshape(b, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
        attn = self.dropout(scores.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, length, d)
        return self.proj(out)


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.mlp(self.ln2(x)))


@ARCHITECTURES.register("transformer")
class Transformer(Classifier):
    """Pre-LN transformer encoder classifier (Vaswani et al. 2017; pre-LN per Xiong et al. 2020).

    Float sequences ``[N, L]`` project each scalar position to ``d_model``; ``[N, C, L]``
    projects each position's C channels. With ``vocab_size`` set the input is
    ``[N, L]`` int64 token ids. Learned positions, mean-pool over positions, linear head.
    """

    Config = TransformerConfig
    sequence_channels_last = True

    def __init__(self, config: TransformerConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, num_classes)
        if config.vocab_size is not None:
            if len(input_shape) != 1:
                raise _shape_error("transformer", input_shape, "[L] token ids when vocab_size is set")
            length = input_shape[0]
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            self.input_dtype = torch.int64
            self._layout = "tokens"
        elif len(input_shape) == 1:
            length = input_shape[0]
            self.embed = nn.Linear(1, config.d_model)
            self._layout = "scalar"
        elif len(input_shape) == 2:
            channels, length = input_shape
            self.embed = nn.Linear(channels, config.d_model)
            self._layout = "channels"
        else:
            raise _shape_error("transformer", input_shape, "[L] or [C, L] (or [L] token ids with vocab_size)")
        self.pos = nn.Parameter(torch.zeros(1, length, config.d_model))
        nn.init.normal_(self.pos, std=0.02)
        ff = config.dim_feedforward or 4 * config.d_model
        self.blocks = nn.ModuleList(
            EncoderBlock(config.d_model, config.n_heads, ff, config.dropout) for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, num_classes)
        self.stage_paths = [f"blocks.{i}" for i in range(config.n_layers - 1)]

    def forward_features(self, x):
        if self._layout == "scalar":
            x = x.unsqueeze(-1)
        elif self._layout == "channels":
            x = x.transpose(1, 2)
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h).mean(dim=1)


def architecture_names() -> list[str]:
    return ARCHITECTURES.names()


def describe(architecture: dict[str, Any]) -> str:
    """Short human label, e.g. ``mlp(hidden_sizes=[256, 256])``."""
    config = architecture.get("config") or {}
    inner = ", ".join(f"{k}={v}" for k, v in config.items())
    return f"{architecture.get('name')}({inner})"
