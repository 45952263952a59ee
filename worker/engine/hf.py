"""Hugging Face ``transformers`` sequence classifiers as teachers and students (architecture ``hf``).

A teacher is the zip of a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``),
opened with ``from_pretrained(local_files_only=True)``: no remote code, no download
(``HF_HUB_OFFLINE`` is set before transformers is first imported). A student is a config of
the same family, derived from the teacher's config with ``overrides`` (fewer layers, a smaller
width) or from the family's defaults, and optionally initialised from the teacher's layers
(DistilBERT-style: embeddings and every k-th layer). Token data arrive packed as one int64
array ``x`` = ``[N, 2, L]`` (``input_ids``, ``attention_mask``; see ``data.py``), so batches,
teacher caches and the ONNX export carry the mask without knowing about it.

transformers is imported lazily: registering the architecture costs nothing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .architectures import ARCHITECTURES, Classifier
from .config import parse_config, require
from .errors import EngineError

_CODE = "invalid_architecture"
# Families we build, load and test; each maps to its sequence-classification class.
FAMILIES = {
    "bert": "BertForSequenceClassification",
    "distilbert": "DistilBertForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
}
# Student overrides a job spec may set (generic names), and where a family stores them under another name.
OVERRIDABLE = (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
    "num_key_value_heads", "vocab_size", "max_position_embeddings",
)  # fmt: skip
_NATIVE = {
    "distilbert": {
        "num_hidden_layers": "n_layers", "hidden_size": "dim", "num_attention_heads": "n_heads",
        "intermediate_size": "hidden_dim",
    },
}  # fmt: skip
# Keys of a saved config that describe the file, the labels or the hub, not the network.
_NOT_NETWORK = {
    "architectures", "transformers_version", "id2label", "label2id", "num_labels", "dtype", "torch_dtype",
    "_name_or_path", "auto_map", "problem_type", "finetuning_task",
}  # fmt: skip
ARCHIVE_MEMBERS = ("config.json", "model.safetensors")
MAX_CONFIG_BYTES = 1024 * 1024
# A layer of a stack: "bert.encoder.layer.3.attention...", "model.layers.1.mlp...".
_LAYER_KEY = re.compile(r"^(.*\.(?:layer|layers))\.(\d+)\.(.*)$")


def _transformers():
    """Import transformers with the hub switched off: this process never downloads a model."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


@dataclass
class HFConfig:
    model_type: str | None = None  # family (bert, distilbert, llama); null = the first teacher's
    overrides: dict = field(default_factory=dict)  # config fields changed from the base config (OVERRIDABLE)
    init: str = "teacher"  # "teacher": embeddings and every k-th layer copied from teacher 0; "fresh"
    hf_config: dict | None = None  # the complete config; filled when the student is resolved, never by users

    def __post_init__(self):
        require(
            self.model_type is None or self.model_type in FAMILIES,
            _CODE,
            f"unsupported model_type {self.model_type!r}; supported: {', '.join(FAMILIES)}",
            "model_type",
        )
        require(
            self.init in ("teacher", "fresh"), _CODE, f"init must be 'teacher' or 'fresh', got {self.init!r}", "init"
        )
        require(isinstance(self.overrides, dict), _CODE, "overrides must be an object", "overrides")
        self.overrides = {k: v for k, v in self.overrides.items() if v is not None}  # the API sends unset as null
        for key, value in self.overrides.items():
            require(
                key in OVERRIDABLE,
                _CODE,
                f"unknown override {key!r}; valid: {', '.join(OVERRIDABLE)}",
                f"overrides.{key}",
            )
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                _CODE,
                f"overrides.{key} must be a positive integer, got {value!r}",
                f"overrides.{key}",
            )


@ARCHITECTURES.register("hf")
class HFSequenceClassifier(Classifier):
    """A transformers ``*ForSequenceClassification`` model reading packed ``[B, 2, L]`` token ids and mask.

    The HF model sits under ``model``; its own classifier is not named ``head``, so the
    ``embedding`` tap and stage exits (feature methods, self-distillation) do not apply:
    output-level methods (kd, dkd, multi_teacher, teacher_assistant, ...) do.
    """

    Config = HFConfig
    input_dtype = torch.int64

    def __init__(self, config: HFConfig, input_shape: tuple[int, ...], num_classes: int, hf_model=None):
        super().__init__(input_shape, num_classes)
        require(
            len(input_shape) == 2 and input_shape[0] == 2,
            _CODE,
            f"a Hugging Face model reads token data (input_ids and attention_mask, per-sample shape [2, L]); "
            f"this data has per-sample shape {list(input_shape)}",
            "name",
        )
        require(
            config.hf_config is not None,
            _CODE,
            "the model_type's config was not resolved (no hf_config)",
            "model_type",
        )
        self.model = hf_model if hf_model is not None else _from_config(config.hf_config, num_classes)
        self.model_type = self.model.config.model_type
        positions = getattr(self.model.config, "max_position_embeddings", None)
        require(
            positions is None or positions >= input_shape[1],
            _CODE,
            f"sequences have {input_shape[1]} tokens but max_position_embeddings is {positions}",
            "overrides.max_position_embeddings",
        )

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def forward(self, x):
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits

    # ---- hooks used by architectures.load_model / build_student ------------------------------

    @classmethod
    def load(cls, architecture, path, input_shape, num_classes, *, who, param, param_prefix):
        """A ``save_pretrained`` zip, or a ``model.safetensors`` this service wrote for an hf student."""
        if zipfile.is_zipfile(path):
            return _load_archive(Path(path), input_shape, num_classes, who=who, param=param)
        from .weights import read_model_metadata

        # A from_job teacher: the file's metadata has the resolved architecture (the spec only the overrides).
        resolved = read_model_metadata(Path(path))["architecture"]
        return super().load(
            resolved, path, input_shape, num_classes, who=who, param=param, param_prefix=param_prefix
        )

    @classmethod
    def resolve(cls, architecture: dict, teachers: list, param_prefix: str) -> dict:
        """The student's complete config: the first hf teacher's (or the family's defaults) with the overrides."""
        config = parse_config(HFConfig, architecture.get("config"), code=_CODE, prefix=f"{param_prefix}.config")
        if config.hf_config is not None:
            return architecture
        where = f"{param_prefix}.config"
        base_teacher = next((t for t in teachers if isinstance(t, HFSequenceClassifier)), None)
        model_type = config.model_type or (base_teacher.model_type if base_teacher else None)
        require(
            model_type is not None,
            _CODE,
            "model_type is needed: no teacher of this job is a Hugging Face model to take it from",
            f"{where}.model_type",
        )
        same_family = base_teacher is not None and base_teacher.model_type == model_type
        require(
            config.init == "fresh" or same_family,
            _CODE,
            f"init 'teacher' copies layers from a Hugging Face teacher of the same family ({model_type}); "
            "this job has none: use init 'fresh'",
            f"{where}.init",
        )
        transformers = _transformers()
        if same_family:
            base = _network_fields(base_teacher.model.config.to_dict())
        else:
            base = _network_fields(transformers.AutoConfig.for_model(model_type).to_dict())
        native = _NATIVE.get(model_type, {})
        for key, value in config.overrides.items():
            base[native.get(key, key)] = value
            if key in ("hidden_size", "num_attention_heads"):
                base.pop("head_dim", None)  # derived from the two; a stale one breaks the shapes
        base.pop("model_type", None)
        try:
            hf = transformers.AutoConfig.for_model(model_type, **base)
        except (TypeError, ValueError) as err:
            raise EngineError(_CODE, f"the {model_type} config does not accept these overrides: {err}",
                              f"{where}.overrides") from None  # fmt: skip
        _check_shapes(hf, model_type, where)
        if config.init == "teacher":
            teacher_cfg = base_teacher.model.config
            require(
                hf.hidden_size == teacher_cfg.hidden_size,
                _CODE,
                f"init 'teacher' copies the teacher's layers, which needs its hidden_size "
                f"{teacher_cfg.hidden_size} (got {hf.hidden_size}): keep it, or use init 'fresh'",
                f"{where}.overrides.hidden_size",
            )
            require(
                hf.num_hidden_layers <= teacher_cfg.num_hidden_layers,
                _CODE,
                f"init 'teacher' takes every k-th of the teacher's {teacher_cfg.num_hidden_layers} layers; "
                f"the student cannot have more ({hf.num_hidden_layers})",
                f"{where}.overrides.num_hidden_layers",
            )
        resolved = asdict(config)
        resolved.update(model_type=model_type, hf_config=_network_fields(hf.to_dict()))
        return {"name": architecture["name"], "config": resolved}

    def initialise_from(self, teachers: list) -> dict | None:
        """DistilBERT-style init (Sanh et al. 2019): every tensor outside the layer stack by name, and
        student layer j from teacher layer j·k, k = teacher layers // student layers. Returns what was copied."""
        if self.architecture["config"].get("init") != "teacher":
            return None
        teacher = next(t for t in teachers if isinstance(t, HFSequenceClassifier))
        source = teacher.model.state_dict()
        n_student = self.model.config.num_hidden_layers
        stride = max(1, teacher.model.config.num_hidden_layers // n_student)
        copied, kept, layers = 0, [], {}
        target = self.model.state_dict()
        with torch.no_grad():
            for key, tensor in target.items():
                match = _LAYER_KEY.match(key)
                src_key = key
                if match:
                    j = int(match.group(2))
                    layers[j] = j * stride
                    src_key = f"{match.group(1)}.{j * stride}.{match.group(3)}"
                if src_key in source and source[src_key].shape == tensor.shape:
                    tensor.copy_(source[src_key])
                    copied += 1
                else:
                    kept.append(key)
        return {
            "copied_tensors": copied,
            "fresh_tensors": kept[:20],
            "layers": {f"student {j}": f"teacher {i}" for j, i in sorted(layers.items())},
        }

    def export_files(self, out_dir: Path) -> dict[str, Path]:
        """``model_hf.zip``: the ``save_pretrained`` folder (config.json + model.safetensors) at the zip's root."""
        out_dir = Path(out_dir)
        folder = Path(tempfile.mkdtemp(dir=out_dir, prefix="hf-"))
        try:
            model = copy.deepcopy(self.model).to("cpu").float()
            model.config.architectures = [FAMILIES[self.model_type]]
            model.save_pretrained(folder)
            path = out_dir / "model_hf.zip"
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name in ARCHIVE_MEMBERS:
                    zf.write(folder / name, arcname=name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"model_hf.zip": path}


def _network_fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NOT_NETWORK}


def _check_shapes(hf, model_type: str, where: str) -> None:
    heads, width = hf.num_attention_heads, hf.hidden_size
    require(
        width % heads == 0,
        _CODE,
        f"num_attention_heads ({heads}) must divide hidden_size ({width})",
        f"{where}.overrides.num_attention_heads",
    )
    kv = getattr(hf, "num_key_value_heads", None)
    if kv is not None:
        require(
            heads % kv == 0,
            _CODE,
            f"num_key_value_heads ({kv}) must divide num_attention_heads ({heads})",
            f"{where}.overrides.num_key_value_heads",
        )
    if model_type == "llama":
        require(
            hf.pad_token_id is not None,
            _CODE,
            "a decoder classifies at the last non-pad token: its config needs pad_token_id",
            f"{where}.model_type",
        )


def _from_config(hf_config: dict, num_classes: int):
    transformers = _transformers()
    model_type = hf_config.get("model_type")
    require(model_type in FAMILIES, _CODE, f"unsupported model_type {model_type!r}", "model_type")
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(model_type, **fields, num_labels=num_classes)
    return transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)


def _load_archive(path: Path, input_shape, num_classes: int, *, who: str, param: str | None):
    """Unpack the two members (bounded by their declared sizes), then ``from_pretrained`` offline."""
    require(
        len(input_shape) == 2 and input_shape[0] == 2,
        "invalid_data",
        f"{who} is a Hugging Face model and reads token data (input_ids, attention_mask); "
        f"this data has per-sample shape {list(input_shape)}",
        "train_file",
    )
    transformers = _transformers()
    folder = Path(tempfile.mkdtemp(prefix="hf-teacher-"))
    try:
        members = _archive_members(path, who, param)
        with zipfile.ZipFile(path) as zf:
            for name, info in members.items():
                with zf.open(info) as src, open(folder / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
        try:
            saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EngineError("weights_mismatch", f"{who}: config.json is not JSON: {err}", param) from None
        model_type = saved.get("model_type") if isinstance(saved, dict) else None
        if model_type not in FAMILIES or "auto_map" in saved:
            raise EngineError(
                "weights_mismatch",
                f"{who}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)}; "
                "remote code is never run)",
                param,
            )
        saved_labels = len(saved.get("id2label") or {}) or saved.get("num_labels")
        if saved_labels and saved_labels != num_classes:
            raise EngineError(
                "weights_mismatch",
                f"{who}: the model classifies into {saved_labels} labels, the data has {num_classes} classes",
                param,
            )
        try:
            hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                dtype=torch.float32, output_loading_info=True,
            )  # fmt: skip
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise EngineError("weights_mismatch", f"{who}: cannot load the model: {err}", param) from None
        problems = [
            f"{kind.replace('_', ' ')}: {sorted(keys)[:5]}"
            for kind, keys in info.items()
            if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys
        ]
        if problems:
            raise EngineError(
                "weights_mismatch",
                f"{who}: model.safetensors does not fit config.json ({'; '.join(problems)})",
                param,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    config = HFConfig(model_type=model_type, init="fresh", hf_config=_network_fields(hf_model.config.to_dict()))
    model = HFSequenceClassifier(config, input_shape, num_classes, hf_model=hf_model)
    model.architecture = {"name": "hf", "config": asdict(config)}
    return model


def _archive_members(path: Path, who: str, param: str | None) -> dict[str, zipfile.ZipInfo]:
    """config.json and model.safetensors, at the root or in one folder; nothing else."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except zipfile.BadZipFile as err:
        raise EngineError("weights_mismatch", f"{who}: not a zip archive: {err}", param) from None
    members = {i.filename.rsplit("/", 1)[-1]: i for i in infos}
    if sorted(members) != sorted(ARCHIVE_MEMBERS) or len(infos) != len(ARCHIVE_MEMBERS):
        raise EngineError(
            "weights_mismatch",
            f"{who}: the archive must hold exactly {', '.join(ARCHIVE_MEMBERS)}; found "
            f"{sorted(i.filename for i in infos)[:10]}",
            param,
        )
    if members["config.json"].file_size > MAX_CONFIG_BYTES:
        raise EngineError("weights_mismatch", f"{who}: config.json is larger than {MAX_CONFIG_BYTES} bytes", param)
    return members
