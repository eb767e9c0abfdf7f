"""The dataset spec: the single source of truth for a task's features, target and task type.

The request model of the API, the dashboard form, validation, preprocessing, drift monitoring and the
synthetic generator all read a `DatasetSpec`; adding a feature is a change to one YAML file.
"""

from __future__ import annotations

from enum import Enum
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from health_mlops.errors import SpecError

BUILTIN_SPECS = ("health-risk", "diabetes")


class Source(str, Enum):
    wearable = "wearable"
    air_quality = "air_quality"
    weather = "weather"
    demographic = "demographic"
    clinical = "clinical"
    laboratory = "laboratory"


class MissingPolicy(BaseModel):
    """How a feature's "not measured" is written and treated: an empty field is always missing, and so is any of
    `codes` (e.g. a lab export's 0 or -9); a missing value is imputed with the federated mean (numeric) or the most
    common category, and `indicator` adds a 0/1 input saying it was missing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    codes: tuple[str, ...] = ()
    impute: Literal["mean", "mode"] | None = None  # mean for numeric features, mode for categorical (the default)
    indicator: bool = False

    @field_validator("codes", mode="before")
    @classmethod
    def _codes_as_strings(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(str(v).strip() for v in value)
        return value


class DirectionFrom(BaseModel):
    """Where a numeric feature's direction holds: `above` a value (risk rises, or falls, as the value rises past
    it) or `below` one (as the value falls past it); free on the other side."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    side: Literal["above", "below"]
    value: float


class Feature(BaseModel):
    """One input column: its type, unit, allowed values and where it comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    type: Literal["numeric", "categorical"]
    label: str | None = None  # what a person reads (forms, tables); default: the name in words
    description: str = ""
    unit: str | None = None
    decimals: int | None = Field(None, ge=0, le=6)  # how precisely a value is shown; default: from the range
    source: Source
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None
    # How a hospital's files may write a category, e.g. {"1": "F", "2": "M"} (compared without case)
    codes: dict[str, str] | None = None
    missing: MissingPolicy | None = None  # None: a missing value makes the row invalid
    # The prediction never falls as the value rises ("increasing") or never rises ("decreasing"); for a
    # categorical feature, along the order of its categories. Enforced in training (`ml/directions.py`). A numeric
    # feature's may hold only from a value on: `direction: {increasing: {above: 100}}` (a heart rate, whose risk
    # also rises in bradycardia, is then free below 100), read into `direction` and `direction_from`.
    direction: Literal["increasing", "decreasing"] | None = None
    direction_from: DirectionFrom | None = None

    @model_validator(mode="before")
    @classmethod
    def _direction_from_a_value(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(direction := data.get("direction"), dict):
            if len(direction) != 1 or not isinstance(where := next(iter(direction.values())), dict) or len(where) != 1:
                raise ValueError(f"feature {data.get('name')!r}: a direction from a value is written "
                                 "{increasing: {above: 100}} (or decreasing, or below)")
            [(way, where)] = direction.items()
            [(side, value)] = where.items()
            return {**data, "direction": way, "direction_from": {"side": side, "value": value}}
        return data

    @field_validator("categories", mode="before")
    @classmethod
    def _categories_as_strings(cls, value: object) -> object:
        # YAML reads `[0, 1]` as ints; files hold them as text, so categories are compared as text.
        if isinstance(value, list | tuple):
            return tuple(str(v) for v in value)
        return value

    @field_validator("codes", mode="before")
    @classmethod
    def _codes_as_text(cls, value: object) -> object:
        # YAML reads `{1: F}` with a number as the key; files hold text.
        return {str(k).strip(): str(v) for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_codes(self) -> Feature:
        if self.codes is None:
            return self
        if self.type != "categorical":
            raise ValueError(f"feature {self.name!r}: codes are for categorical features")
        categories = {c.lower(): c for c in self.categories or ()}
        folded = [k.lower() for k in self.codes]
        if "" in folded or len(set(folded)) != len(folded):
            raise ValueError(f"feature {self.name!r}: each code must be non-empty and distinct (without case)")
        for code, category in self.codes.items():
            if category not in (self.categories or ()):
                raise ValueError(f"feature {self.name!r}: code {code!r} names {category!r}, not one of its "
                                 f"categories {list(self.categories or ())}")
            if categories.get(code.lower(), category) != category:
                raise ValueError(f"feature {self.name!r}: code {code!r} is also the category "
                                 f"{categories[code.lower()]!r}")
        return self

    @model_validator(mode="after")
    def _check_kind(self) -> Feature:
        if self.type == "numeric":
            if self.min is None or self.max is None:
                raise ValueError(f"numeric feature {self.name!r} needs min and max")
            if self.min >= self.max:
                raise ValueError(f"feature {self.name!r}: min must be below max")
            if self.categories is not None:
                raise ValueError(f"numeric feature {self.name!r} cannot have categories")
        else:
            if not self.categories or len(set(self.categories)) != len(self.categories):
                raise ValueError(f"categorical feature {self.name!r} needs distinct categories")
            if self.min is not None or self.max is not None:
                raise ValueError(f"categorical feature {self.name!r} cannot have min/max")
        if self.missing is not None:
            self._check_missing(self.missing)
        if self.direction_from is not None:
            if self.direction is None:
                raise ValueError(f"feature {self.name!r}: direction_from needs a direction")
            if self.type != "numeric":
                raise ValueError(f"feature {self.name!r}: a direction from a value is for numeric features")
            if not (self.min or 0.0) < self.direction_from.value < (self.max or 0.0):
                raise ValueError(f"feature {self.name!r}: its direction's {self.direction_from.side} "
                                 f"{self.direction_from.value:g} must lie inside its range ({self.min:g} to "
                                 f"{self.max:g})")
        return self

    def _check_missing(self, missing: MissingPolicy) -> None:
        if self.type == "numeric":
            if missing.impute == "mode":
                raise ValueError(f"numeric feature {self.name!r} imputes its mean, not a mode")
            for code in missing.codes:
                try:
                    float(code)
                except ValueError:
                    raise ValueError(f"feature {self.name!r}: missing code {code!r} is not a number") from None
        else:
            if missing.impute == "mean":
                raise ValueError(f"categorical feature {self.name!r} imputes its most common category (mode), "
                                 "not a mean")
            clashing = sorted(set(missing.codes) & set(self.categories or ()))
            if clashing:
                raise ValueError(f"feature {self.name!r}: missing codes {clashing} are also categories")

    @property
    def has_indicator(self) -> bool:
        return self.missing is not None and self.missing.indicator

    @property
    def display_label(self) -> str:
        return self.label or _words(self.name)

    @property
    def is_yes_no(self) -> bool:
        """A diagnosis or a flag: categories 0 and 1, read as No and Yes."""
        return self.categories == ("0", "1")

    @property
    def display_decimals(self) -> int:
        """Decimals a value of this numeric feature is shown with: the spec's, else none over a range of
        hundreds (steps, AQI), one below."""
        if self.decimals is not None:
            return self.decimals
        return 0 if (self.max or 0) - (self.min or 0) >= 200 else 1

    def spellings(self) -> dict[str, str]:
        """A categorical feature's accepted spellings, lower-cased, to its category: each category and each code."""
        return {**{code.lower(): category for code, category in (self.codes or {}).items()},
                **{category.lower(): category for category in self.categories or ()}}

    def allowed(self) -> str:
        """Human wording of the allowed values, used in every validation message."""
        if self.type == "numeric":
            unit = f" {self.unit}" if self.unit else ""
            return f"{self.min:g} to {self.max:g}{unit}"
        written = f" (or as coded: {', '.join(f'{k} = {v}' for k, v in self.codes.items())})" if self.codes else ""
        return "one of " + ", ".join(self.categories or ()) + written


def _words(name: str) -> str:
    """`body_temperature` -> "Body temperature"."""
    text = name.replace("_", " ")
    return text[:1].upper() + text[1:]


class Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    label: str | None = None  # what a person reads: "an ER visit or admission within 7 days"
    description: str = ""
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    # Binary tasks: how the files write each outcome, e.g. {"0_no": 0, "1_yes": 1} (compared without case); unset,
    # they write 0 and 1.
    labels: dict[str, Literal[0, 1]] | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: object) -> object:
        # YAML reads a label written 0 or 1 as a number; files hold text.
        return {str(k).strip(): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_labels(self) -> Target:
        if self.labels is not None:
            if set(self.labels.values()) != {0, 1}:
                raise ValueError(f"target labels: both outcomes need a label (0 and 1), got {self.labels}")
            folded = [k.lower() for k in self.labels]
            if "" in folded or len(set(folded)) != len(folded):
                raise ValueError("target labels: each label must be non-empty and distinct (without case)")
        return self

    @property
    def display_label(self) -> str:
        return self.label or _words(self.name)


class ModelDefaults(BaseModel):
    """The model a task trains unless told otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["linear", "mlp"] = "mlp"
    hidden: tuple[int, ...] = (32, 16)


class TrainingHints(BaseModel):
    """Training settings a task needs over the global defaults (epochs here ask for epochs, not the step budget)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)


class DatasetSpec(BaseModel):
    """A task: its features, its target and how to learn it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    title: str | None = None  # what people call the task (the dashboard's heading); unset, the name
    description: str = ""
    task: Literal["binary", "regression"]
    target: Target
    features: tuple[Feature, ...]
    site_column: str | None = None
    model: ModelDefaults = ModelDefaults()
    training: TrainingHints = TrainingHints()
    # Binary tasks: the risk at or above which a patient is flagged; unset, the training rows' event rate
    decision_threshold: float | None = Field(None, gt=0, lt=1)
    # What the model may be used for, shown wherever it scores a patient (the dashboard's notice)
    intended_use: str | None = None

    @model_validator(mode="after")
    def _check_names(self) -> DatasetSpec:
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"features listed twice: {', '.join(duplicated)}")
        if self.target.name in names:
            raise ValueError(f"target {self.target.name!r} is also listed as a feature")
        if self.task == "regression" and (self.target.min is None or self.target.max is None):
            raise ValueError("a regression target needs min and max")
        if self.task == "regression" and self.decision_threshold is not None:
            raise ValueError("a decision threshold is for binary tasks")
        if self.task == "regression" and self.target.labels is not None:
            raise ValueError("target labels are for binary tasks")
        return self

    @property
    def display_title(self) -> str:
        return self.title or self.name

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def required_columns(self) -> list[str]:
        return [*self.feature_names, self.target.name]

    @cached_property
    def by_name(self) -> dict[str, Feature]:
        return {f.name: f for f in self.features}

    @property
    def target_feature(self) -> Feature:
        """The target as a column to validate: 0/1 for binary tasks, its range for regression."""
        if self.task == "binary":
            labels = tuple(self.target.labels) if self.target.labels is not None else ("0", "1")
            return Feature(name=self.target.name, type="categorical", categories=labels,
                           source=Source.clinical, description=self.target.description)
        return Feature(name=self.target.name, type="numeric", min=self.target.min, max=self.target.max,
                       unit=self.target.unit, source=Source.clinical, description=self.target.description)

    @property
    def primary_metric(self) -> str:
        return "auc" if self.task == "binary" else "r2"

    def threshold_for(self, event_rate: float) -> float:
        """The decision threshold of a model trained on rows with this event rate: the spec's, or the rate (a
        patient is flagged when their risk is above the training population's). Rows with no event, or nothing
        but events, say nothing of where to flag: 0.5 then (a rate of 0 flagged every patient, 1 none)."""
        if self.decision_threshold is not None:
            return self.decision_threshold
        return event_rate if 0.0 < event_rate < 1.0 else 0.5


# A data folder describes itself with this file beside its hospital folders (`data generate` writes it).
SPEC_FILE_NAME = "spec.yaml"


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """Load a built-in spec by name (`health-risk`) or a YAML file by path."""
    text: str
    origin: str
    if str(name_or_path) in BUILTIN_SPECS:
        origin = f"built-in spec {name_or_path}"
        text = resources.files("health_mlops.specs").joinpath(f"{name_or_path}.yaml").read_text("utf-8")
    else:
        path = Path(name_or_path)
        origin = str(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such spec file (built-in specs: {', '.join(BUILTIN_SPECS)})")
        text = path.read_text("utf-8")
    return load_spec_text(text, origin=origin)


def spec_for_data(name_or_path: str | None, data: Path | None) -> DatasetSpec:
    """The spec named (a built-in name or a YAML path) if any, else the data folder's own `spec.yaml`, else the
    built-in health-risk task."""
    if name_or_path is not None:
        return load_spec(name_or_path)
    if data is not None and data.is_dir() and (data / SPEC_FILE_NAME).is_file():
        return load_spec(data / SPEC_FILE_NAME)
    return load_spec("health-risk")


def load_spec_text(text: str, *, origin: str = "spec") -> DatasetSpec:
    """A spec from its YAML text (e.g. the copy registered with a model)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{origin}: not valid YAML: {exc}") from exc
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{origin}: {exc}") from exc


def spec_to_yaml(spec: DatasetSpec) -> str:
    """Serialise a spec back to YAML (written next to generated data so the folder is self-describing)."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)
