"""Request and response schemas (Pydantic v2). Requests forbid unknown fields so typos are 422s, not surprises."""

from datetime import datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.webhooks import check_webhook_url

FILE_ID = r"^file_[0-9a-f]{22}$"
JOB_ID = r"^job_[0-9a-f]{22}$"
BUILTIN_DATA = ("builtin:mnist1d", "builtin:mnist1d:test", "builtin:digits")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- job spec ------------------------------------------------------------------------------------


# Bounds on architecture options, so an absurd model is a 422 here rather than an out-of-memory worker.
MAX_CONFIG_NUMBER = 16_384
MAX_CONFIG_LIST = 64


def _check_config(value: Any, path: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        if not -MAX_CONFIG_NUMBER <= value <= MAX_CONFIG_NUMBER:
            raise ValueError(f"config.{path} = {value} is outside [-{MAX_CONFIG_NUMBER}, {MAX_CONFIG_NUMBER}]")
    elif isinstance(value, str):
        if len(value) > 100:
            raise ValueError(f"config.{path} is longer than 100 characters")
    elif isinstance(value, list):
        if len(value) > MAX_CONFIG_LIST:
            raise ValueError(f"config.{path} has {len(value)} items; at most {MAX_CONFIG_LIST}")
        for i, item in enumerate(value):
            _check_config(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        if path.count(".") >= 3:
            raise ValueError(f"config.{path} is nested too deeply")
        for key, item in value.items():
            _check_config(item, f"{path}.{key}" if path else key)
    else:
        raise ValueError(f"config.{path} has an unsupported type")  # noqa: TRY004 (pydantic reports ValueError)


class BuiltinArchitecture(Strict):
    name: Literal["mlp", "cnn1d", "cnn2d", "resnet_cifar", "transformer"] = Field(
        description="Registered architecture name."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, max_length=32,
        description=f"Builder options (numbers within ±{MAX_CONFIG_NUMBER}, lists of at most {MAX_CONFIG_LIST}); "
        "each architecture's options are checked by the worker.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _bounded(self):
        _check_config(self.config, "")
        return self


HF_MODEL_TYPES = ("bert", "distilbert", "llama")  # app/file_checks.py HF_FAMILIES; worker/engine/hf.py FAMILIES


class HFOverrides(Strict):
    """Config fields a transformers student changes from its base config (the teacher's, or the family's)."""

    num_hidden_layers: int | None = Field(default=None, ge=1, le=128)
    hidden_size: int | None = Field(default=None, ge=1, le=MAX_CONFIG_NUMBER)
    num_attention_heads: int | None = Field(default=None, ge=1, le=256)
    intermediate_size: int | None = Field(default=None, ge=1, le=4 * MAX_CONFIG_NUMBER)
    num_key_value_heads: int | None = Field(default=None, ge=1, le=256, description="Decoder families.")
    vocab_size: int | None = Field(default=None, ge=2, le=262_144)
    max_position_embeddings: int | None = Field(default=None, ge=1, le=65_536)


class HFArchitectureConfig(Strict):
    model_type: Literal[HF_MODEL_TYPES] | None = Field(  # type: ignore[valid-type]
        default=None, description="Family; null = the Hugging Face teacher's."
    )
    overrides: HFOverrides = Field(default_factory=HFOverrides)
    init: Literal["teacher", "fresh"] = Field(
        default="teacher",
        description="teacher: embeddings and every k-th layer copied from the teacher (same hidden_size, at most "
        "its layers); fresh: random initialisation.",
    )


class HFArchitecture(Strict):
    """A transformers sequence classifier: as a teacher, a zipped save_pretrained folder (config {}); as a
    student, the teacher's config (or the family's) with `overrides`."""

    name: Literal["hf"]
    config: HFArchitectureConfig = Field(default_factory=HFArchitectureConfig)


Architecture = Annotated[BuiltinArchitecture | HFArchitecture, Field(discriminator="name")]


class Teacher(Strict):
    architecture: Architecture | None = Field(
        default=None, description="Required with weights_file; taken from the job's model with from_job."
    )
    weights_file: str | None = Field(default=None, pattern=FILE_ID, description="An uploaded safetensors file, or a zipped save_pretrained folder (architecture hf).")
    from_job: str | None = Field(default=None, pattern=JOB_ID, description="A succeeded job whose model teaches.")
    weight: float = Field(default=1.0, gt=0, description="Fusion weight (multi-teacher `weighted`).")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.weights_file is None) == (self.from_job is None):
            raise ValueError("give exactly one of weights_file or from_job")
        if self.weights_file is not None and self.architecture is None:
            raise ValueError("architecture is required with weights_file")
        return self


class Student(Strict):
    architecture: Architecture


class MethodBase(Strict):
    """What every `method` shares: which data arrays it needs (checked against the uploaded files' details)."""

    needs_x_teacher: ClassVar[bool] = False  # the train data must hold the teacher's modality `x_teacher`

    def needs_labels(self) -> bool:
        """Whether the data must hold labels `y`; only teacher-alone distillation (alpha = 1) does without."""
        alpha = getattr(self, "alpha", None)
        return alpha is None or alpha == "auto" or alpha < 1.0


Temperature = Annotated[
    Annotated[float, Field(gt=0, le=100)] | Literal["auto"],
    Field(description='Softening temperature T; "auto" chooses it on the validation split (recipe search).'),
]
KDAlpha = Annotated[
    Annotated[float, Field(ge=0, le=1)] | Literal["auto"],
    Field(description='Weight of the distillation term (1 - alpha goes to label CE); "auto" chooses it.'),
]


class FeaturePair(Strict):
    """A student module path and the teacher module path it learns from (`embedding` = the head's input)."""

    student: str = Field(min_length=1, max_length=200, description="Student module path, e.g. `net.3`.")
    teacher: str = Field(min_length=1, max_length=200, description="Teacher module path, e.g. `layer2`.")


def _embedding_pair() -> list[FeaturePair]:
    return [FeaturePair(student="embedding", teacher="embedding")]


class SupervisedMethod(MethodBase):
    """Cross-entropy from labels only: teachers and the from-scratch baseline."""

    type: Literal["supervised"]


class KDMethod(MethodBase):
    """Hinton et al. 2015: (1-alpha)*CE + alpha*T^2*KL(p_teacher || p_student)."""

    type: Literal["kd"]
    temperature: Temperature = 4.0
    alpha: KDAlpha = 0.5


class DKDMethod(MethodBase):
    """Decoupled KD, Zhao et al. 2022: ce_weight*CE + ramp*T^2*(alpha*TCKD + beta*NCKD), where
    KL = TCKD + (1 - p_t,target)*NCKD; ramp grows linearly to 1 over warmup_epochs. Needs labels."""

    type: Literal["dkd"]
    alpha: float = Field(default=1.0, ge=0, le=100, description="Weight of the target-class term TCKD.")
    beta: float = Field(default=8.0, ge=0, le=100, description="Weight of the non-target-class term NCKD.")
    temperature: Temperature = 4.0
    warmup_epochs: int = Field(default=5, ge=0, le=10_000, description="Epochs of linear ramp-up (0 = none).")
    ce_weight: float = Field(default=1.0, ge=0, le=100, description="Weight of label cross-entropy.")

    def needs_labels(self) -> bool:
        return True


class MultiTeacherMethod(MethodBase):
    """You et al. 2017; CA-MKD, Zhang et al. 2022: KD toward the teachers' fused distribution
    sum_k w_k*softmax(z_k/T). fusion: mean (w = 1/K), weighted (the teachers' `weight`), confidence
    (per sample, softmax over -CE of each teacher on the label). Needs at least 2 teachers."""

    type: Literal["multi_teacher"]
    fusion: Literal["mean", "weighted", "confidence"] = "mean"
    temperature: Temperature = 4.0
    alpha: KDAlpha = 0.5

    def needs_labels(self) -> bool:
        return self.alpha == "auto" or self.alpha < 1.0 or self.fusion == "confidence"


class FeatureMethod(MethodBase):
    """FitNets, Romero et al. 2015: KD + beta*sum ||r(F_s) - F_t||^2 over `pairs` of module outputs,
    r a learned 1x1 conv / linear regressor (trained with the student, not exported)."""

    type: Literal["feature"]
    pairs: list[FeaturePair] = Field(default_factory=_embedding_pair, min_length=1, max_length=16)
    beta: float = Field(default=1.0, ge=0, le=1e6, description="Weight of the hint term.")
    temperature: Temperature = 4.0
    alpha: KDAlpha = 0.5


class AttentionMethod(MethodBase):
    """Attention transfer, Zagoruyko & Komodakis 2017: KD + beta/2*sum ||Q_s/|Q_s| - Q_t/|Q_t|||^2,
    Q = sum_c A_c^2 of each paired module's output; beta = 1000 as in the paper."""

    type: Literal["attention"]
    pairs: list[FeaturePair] = Field(min_length=1, max_length=16, description="Module paths to match.")
    beta: float = Field(default=1000.0, ge=0, le=1e6)
    temperature: Temperature = 4.0
    alpha: KDAlpha = 0.5


class RelationMethod(MethodBase):
    """Relational KD, Park et al. 2019: KD + distance_weight*Huber(psi_D) + angle_weight*Huber(psi_A)
    on embeddings (default: the input of each model's head); weights 25 and 50 as in the paper."""

    type: Literal["relation"]
    pairs: list[FeaturePair] = Field(default_factory=_embedding_pair, min_length=1, max_length=16)
    distance_weight: float = Field(default=25.0, ge=0, le=1e6)
    angle_weight: float = Field(default=50.0, ge=0, le=1e6)
    temperature: Temperature = 4.0
    alpha: KDAlpha = 0.5


class SelfDistillMethod(MethodBase):
    """Be Your Own Teacher, Zhang et al. 2019 (+ born-again generations, Furlanello et al. 2018): no teacher;
    auxiliary heads on `exits` learn from the final head (KL at T + feature L2). Needs labels."""

    type: Literal["self_distill"]
    exits: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=16, description="Student module paths; null = the architecture's stages."
    )
    temperature: Temperature = 3.0
    alpha: KDAlpha = Field(default=0.5, description="Per exit: (1-alpha)*CE + alpha*T^2*KL; "
                                                              "also the born-again KD weight.")  # fmt: skip
    feature_weight: float = Field(default=0.1, ge=0, le=1e6)
    generations: int = Field(default=1, ge=1, le=10, description="Born-again generations (1 = none).")

    def needs_labels(self) -> bool:
        return True


class QuantizationMethod(MethodBase):
    """Polino et al. 2018; Apprentice, Mishra & Marr 2018: quantisation-aware training of the student
    (fake-quantised weights and activations, straight-through) under a float teacher's KD."""

    type: Literal["quantization"]
    bits: Literal[4, 8] = 8
    temperature: Temperature = 4.0
    alpha: KDAlpha = 0.5


class CrossModalMethod(MethodBase):
    """Cross-modal distillation, Gupta et al. 2016: the teacher reads `x_teacher`, the student `x`
    (paired rows); with alpha = 1 (the default) no labels are needed."""

    type: Literal["cross_modal"]
    needs_x_teacher: ClassVar[bool] = True
    temperature: Temperature = 4.0
    alpha: KDAlpha = 1.0


class TeacherAssistantMethod(MethodBase):
    """TAKD, Mirzadeh et al. 2020: teacher -> assistants -> student, each link plain KD."""

    type: Literal["teacher_assistant"]
    assistants: list[Architecture] = Field(min_length=1, max_length=8, description="Largest first.")
    temperature: Temperature = 4.0
    alpha: KDAlpha = 0.5
    assistant_epochs: int | None = Field(default=None, ge=1, le=10_000, description="null = `epochs`.")


Method = Annotated[
    SupervisedMethod | KDMethod | DKDMethod | MultiTeacherMethod | FeatureMethod | AttentionMethod
    | RelationMethod | SelfDistillMethod | QuantizationMethod | CrossModalMethod | TeacherAssistantMethod,
    Field(discriminator="type"),
]  # fmt: skip
TEACHERLESS_METHODS = {"supervised", "self_distill"}
FEATURE_METHODS = {"feature", "attention", "relation"}
MULTI_TEACHER_METHODS = {"multi_teacher"}  # every other teacher method takes exactly one teacher


class MixingAugmentation(Strict):
    alpha: float = Field(default=1.0, gt=0, le=100, description="The mixing weight is drawn from Beta(alpha, alpha).")


class MixupAugmentation(MixingAugmentation):
    """mixup (Zhang et al. 2018): rows and labels blended with a shuffled batch."""

    type: Literal["mixup"]


class CutmixAugmentation(MixingAugmentation):
    """CutMix (Yun et al. 2019): a box (images) or segment (sequences) pasted from a shuffled batch."""

    type: Literal["cutmix"]


class NoiseAugmentation(Strict):
    """Additive Gaussian noise, `std` times the training inputs' standard deviation."""

    type: Literal["noise"]
    std: float = Field(default=0.1, gt=0, le=10)


class ShiftAugmentation(Strict):
    """A random translation of up to `max_shift` positions per row (sequences: length; images: H and W)."""

    type: Literal["shift"]
    max_shift: int = Field(default=4, ge=1, le=1024)


AugmentationName = Literal["mixup", "cutmix", "noise", "shift"]
AugmentationStep = Annotated[
    MixupAugmentation | CutmixAugmentation | NoiseAugmentation | ShiftAugmentation, Field(discriminator="type")
]
MIXING_AUGMENTATIONS = {"mixup", "cutmix"}


ColumnName = Annotated[str, Field(min_length=1, max_length=200)]


class DataOptions(Strict):
    """How image-folder zips and tables become arrays; array files (npz, safetensors) need none of it."""

    image_size: tuple[Annotated[int, Field(ge=1, le=1024)], Annotated[int, Field(ge=1, le=1024)]] | None = Field(
        default=None, description="Image folders: [H, W] every image is resized to (required for them)."
    )
    image_mode: Literal["L", "RGB"] = Field(default="RGB", description="Image folders: L = 1 channel, RGB = 3.")
    label_column: ColumnName | None = Field(default=None, description="Tables: the column of labels (required).")
    feature_columns: list[ColumnName] | None = Field(
        default=None, min_length=1, max_length=4096,
        description="Tables: the numeric input columns; null = every column but the label.",
    )  # fmt: skip


class Hyperparameters(Strict):
    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    learning_rate: float = Field(default=3e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "constant"] = "cosine"
    seed: int = Field(default=0, ge=0)
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    baseline: bool = Field(default=False, description="Also train the student supervised with the same budget.")
    max_grad_norm: float | None = Field(default=None, gt=0)


class JobCreate(Strict):
    name: str | None = Field(default=None, max_length=200)
    teachers: list[Teacher] = Field(default_factory=list, max_length=16)
    student: Student
    train_file: str = Field(description="A dataset file id, or builtin:mnist1d / builtin:digits.")
    validation_file: str | None = None
    method: Method
    data: DataOptions = Field(default_factory=DataOptions, description="Options for image folders and tables.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    augmentation: Literal["none"] | AugmentationName | list[AugmentationName | AugmentationStep] = Field(
        default="none",
        description="Applied to every training batch, in order; the teachers score exactly the batch the "
        "student sees (function matching). The baseline trains with the same augmentation.",
    )
    teacher_outputs: Literal["cached", "fresh", "pool"] | None = Field(
        default=None,
        description="cached: computed once (unaugmented inputs only); fresh: the teachers run on every batch; "
        "pool: `pool_size` augmented views scored once and cycled. null: cached, or fresh with an augmentation.",
    )
    pool_size: int = Field(default=8, ge=1, le=64, description="Augmented views in a `pool`.")
    recipe: Literal["auto"] | None = Field(
        default=None,
        description='"auto": probe runs on the validation split choose temperature, alpha and augmentation '
        "(successive halving within recipe_budget); a same-budget baseline is trained and the better model ships.",
    )
    recipe_budget: float = Field(
        default=0.5, gt=0, le=4, description="Probe cost limit, as a multiple of `epochs` full-data epochs."
    )
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    webhook_url: str | None = Field(
        default=None,
        description="Called with a signed POST when the job succeeds, fails or is cancelled (README "
        '"Webhooks"). https; no credentials in the URL; private and loopback targets are refused by default.',
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url_allowed(cls, v: str | None) -> str | None:
        return None if v is None else check_webhook_url(v)

    @model_validator(mode="after")
    def _teachers_match_method(self):
        if self.method.type in TEACHERLESS_METHODS and self.teachers:
            raise ValueError(f"method {self.method.type!r} takes no teachers")
        if self.method.type not in TEACHERLESS_METHODS and not self.teachers:
            raise ValueError(f"method {self.method.type!r} needs at least one teacher")
        if self.method.type in MULTI_TEACHER_METHODS and len(self.teachers) < 2:
            _field_error("teachers", f"method {self.method.type!r} needs at least 2 teachers, got "
                                     f"{len(self.teachers)}", self.teachers)  # fmt: skip
        if self.method.type not in MULTI_TEACHER_METHODS and len(self.teachers) > 1:
            _field_error("teachers", f"method {self.method.type!r} takes one teacher, got {len(self.teachers)}; "
                                     "use multi_teacher for ensembles", self.teachers)  # fmt: skip
        return self

    @model_validator(mode="after")
    def _augmentation_fits_teacher_outputs(self):
        augmented = self.augmentation != "none" and self.augmentation != []
        if augmented and getattr(self.method, "needs_x_teacher", False):
            _field_error("augmentation", "the teachers read x_teacher, which an augmentation of x does not "
                                         "change; consistent teaching needs the same input", self.augmentation)  # fmt: skip
        if augmented and self.teacher_outputs == "cached":
            _field_error("teacher_outputs", "cached teacher outputs need unaugmented inputs: use fresh or pool",
                         self.teacher_outputs)  # fmt: skip
        if not augmented and self.teacher_outputs == "pool":
            _field_error("teacher_outputs", "a pool holds augmented views: set an augmentation, or use cached",
                         self.teacher_outputs)  # fmt: skip
        if self.teacher_outputs == "pool" and self.method.type in FEATURE_METHODS:
            _field_error("teacher_outputs", f"a pool keeps logits only and {self.method.type!r} matches "
                                            "intermediate features: use fresh", self.teacher_outputs)  # fmt: skip
        return self


def _field_error(field: str, message: str, value: Any) -> None:
    """Raise a validation error located at ``field`` (a model validator's own errors point at the body)."""
    error = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(field,), input=value)
    raise ValidationError.from_exception_data("JobCreate", [error])


# ---- responses -----------------------------------------------------------------------------------


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    purpose: Literal["teacher", "dataset"]
    filename: str
    bytes: int
    sha256: str
    format: str
    created_at: datetime


class JobProgress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    fraction: float = 0.0
    phase: str | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["distillation.job"] = "distillation.job"
    name: str | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    progress: JobProgress
    metrics: dict[str, Any] | None
    error: JobError | None
    metadata: dict[str, Any]


class EventPublic(BaseModel):
    id: int
    object: Literal["distillation.job.event"] = "distillation.job.event"
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any]


class WebhookSecretPublic(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str | None = Field(description="Only in the answer that created it; never shown again.")
    prefix: str = Field(description="The secret's first characters, to tell secrets apart.")
    created_at: datetime
    previous_expires_at: datetime | None = Field(
        description="Until then deliveries also carry a signature made with the previous secret."
    )


class MetricPublic(BaseModel):
    epoch: int
    data: dict[str, Any]


class ArtifactPublic(BaseModel):
    name: str
    object: Literal["artifact"] = "artifact"
    bytes: int
    sha256: str
    content_type: str
    created_at: datetime


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False


FilesPublic = Page[FilePublic]
JobsPublic = Page[JobPublic]
EventsPublic = Page[EventPublic]


class MetricsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricPublic]
    summary: dict[str, Any] | None


class ArtifactsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactPublic]


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[dict[str, Any]] | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the RFC 9457 errors a route can answer."""
    descriptions = {400: "Bad request", 401: "Missing or invalid API key", 404: "Not found (or another tenant's)",
                    408: "Upload too slow", 409: "Conflict with the job's state", 413: "Upload over the size cap",
                    416: "Range not satisfiable", 422: "Invalid request; `errors` names each field",
                    429: "Too many active jobs", 503: "A dependency (database) is unavailable"}  # fmt: skip
    return {
        status: {"description": descriptions[status], "model": Problem,
                 "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for status in statuses
    }  # fmt: skip
