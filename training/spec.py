"""The fine-tune spec: one validated pydantic object; errors name the field and the reason."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from training.backbones import BACKBONES
from training.freeze_spec import FreezePolicy, Full
from training.job_settings import TrainingSettings
from training.preprocessing_spec import Augmentation, Preprocessing
from training.storage.errors import SpecError
from training.storage.ids import ID_PATTERN, is_id


def _check_id(value: str) -> str:
    if not is_id(value):
        raise ValueError(f"must match {ID_PATTERN}")
    return value


Id = Annotated[str, AfterValidator(_check_id)]


def _caps(info: ValidationInfo) -> TrainingSettings:
    ctx = info.context or {}
    caps = ctx.get("training")
    return caps if isinstance(caps, TrainingSettings) else TrainingSettings()


class BaseModelSpec(BaseModel):
    """What to start from: a torchvision backbone (random, enum or URI weights) or a
    published Refit version (``name@version`` or ``name@alias``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    backbone: str | None = None
    weights: str | None = None
    """torchvision enum name (``IMAGENET1K_V1``, ``DEFAULT``) or ``s3://``/``file://`` URI."""
    version: str | None = None

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str | None) -> str | None:
        if v is not None and v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; valid: {', '.join(sorted(BACKBONES))}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_form(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and v.startswith("file://") and _caps(info).local_weights_dir is None:
            # refused at create time, not when the job runs
            raise ValueError(
                "file:// weights are disabled: REFIT_TRAINING__LOCAL_WEIGHTS_DIR is unset"
            )
        if v is None or v.startswith(("s3://", "file://")) or v.replace("_", "").isalnum():
            return v
        raise ValueError(
            "must be a torchvision weights name (e.g. IMAGENET1K_V1) or an "
            "s3:// or file:// URI of a safetensors file"
        )

    @field_validator("version")
    @classmethod
    def _version_form(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name, sep, ver = v.partition("@")
        if not sep or not is_id(name) or not is_id(ver):
            raise ValueError("must be 'model@version' or 'model@alias' (lowercase ids)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSpec:
        if self.version and self.weights:
            raise ValueError("give either weights or version, not both")
        if not self.version and not self.backbone:
            raise ValueError("give a backbone (with optional weights) or a published version")
        return self


class GateSpec(BaseModel):
    """Publish only if top-1 >= ``min_accuracy`` and not worse than the serving model by more
    than ``max_regression``. Unset fields take the settings' defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    max_regression: float | None = Field(default=None, ge=0, le=1)


class FinetuneSpec(BaseModel):
    """One fine-tune job."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: Id
    base: BaseModelSpec
    dataset: str
    """``s3://bucket/prefix/datasets/NAME/`` (ImageFolder) or ``.../NAME.jsonl`` (manifest)."""
    freeze: FreezePolicy = Field(default_factory=Full)
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0, le=10)
    workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.05, ge=0, le=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    warmup_epochs: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    preprocess: Preprocessing | None = None
    """Overrides the preprocessing that comes with the base weights."""
    augment: Augmentation = Field(default_factory=Augmentation)
    val_fraction: float = Field(default=0.2, gt=0, le=0.5)
    """Share of each class held out when the dataset has no ``val/`` split."""
    seed: int = 0
    gate: GateSpec = Field(default_factory=GateSpec)
    promote: bool = True
    """Move ``alias`` to the new version when the gate passes."""
    alias: Id = "production"
    max_corrupt_fraction: float | None = Field(default=None, ge=0, le=1)
    bf16: bool | None = None
    """bf16 autocast (with channels_last); unset: on for GPU, off for CPU."""

    @field_validator("epochs")
    @classmethod
    def _epochs_cap(cls, v: int, info: ValidationInfo) -> int:
        cap = _caps(info).max_epochs
        if v > cap:
            raise ValueError(f"must be at most {cap}")
        probe = getattr(info.data.get("freeze"), "probe_epochs", None)
        if probe is not None and probe >= v:
            raise ValueError(f"must be larger than freeze.probe_epochs ({probe})")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_cap(cls, v: int, info: ValidationInfo) -> int:
        cap = _caps(info).max_batch_size
        if v > cap:
            raise ValueError(f"must be at most {cap}")
        return v

    @field_validator("workers")
    @classmethod
    def _workers_cap(cls, v: int, info: ValidationInfo) -> int:
        cap = _caps(info).max_workers
        if v > cap:
            raise ValueError(f"must be at most {cap}")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_form(cls, v: str) -> str:
        if not v.startswith("s3://") or ".." in v:
            raise ValueError("must be an s3:// URI without '..'")
        return v


def _loc(err: Any) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "spec"


def parse_spec(raw: Any, training: TrainingSettings | None = None) -> FinetuneSpec:
    """Validate a spec (dict or JSON string); SpecError names the first bad field and lists
    every problem in its message."""
    ctx = {"training": training or TrainingSettings()}
    try:
        if isinstance(raw, str | bytes):
            return FinetuneSpec.model_validate_json(raw, context=ctx)
        return FinetuneSpec.model_validate(raw, context=ctx)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        parts = [f"{_loc(e)}: {e['msg'].removeprefix('Value error, ')}" for e in errors]
        raise SpecError("; ".join(parts), field=_loc(errors[0])) from None
