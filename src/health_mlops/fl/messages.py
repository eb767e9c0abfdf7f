"""What travels between the aggregator and the hospital nodes.

JSON (pydantic models) for tasks and runs; safetensors for tensors. A task result is one safetensors file:
the tensors (none for `stats` and `evaluate`) plus the result's metadata as JSON in the file's header, so a
result is a single self-describing body that is parsed once and validated before anything is stored.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as load_tensors

from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.errors import HealthMlopsError
from health_mlops.fl.state import Run, Task, TaskKind, TaskResult
from health_mlops.fl.mapped import map_file
from health_mlops.fl.metadata import EvaluationMetadata, FitMetadata, StatsMetadata
from health_mlops.fl.errors import Invalid
from health_mlops.fl.secagg import EncryptedShares, KeyAdvertisement, Reveal
from health_mlops.fl.secure_round import SecurePhase, base64_of
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.strategies import Weights

SAFETENSORS_MEDIA_TYPE = "application/octet-stream"
_METADATA_KEY = "metadata"


class MessageError(HealthMlopsError, ValueError):
    """A body that is not a valid message; the text says what is wrong."""


def encode_weights(weights: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None) -> memoryview:
    """Weights as a float32 safetensors body (what the model computes in; a masked input of secure aggregation
    stays uint64), with optional JSON metadata: a read-only view of one buffer (`bytes(...)` where bytes are
    needed).

    The tensors are written straight into that buffer, so the model is copied once; safetensors' own `save`
    copies it three times (numpy's bytes of each tensor, its serialised buffer, the Python bytes of that), which
    at the aggregator's round close is the difference between two models in memory and four. The layout is
    safetensors' (tensors in name order, the data 8-byte aligned), and safetensors reads it."""
    arrays = {name: np.asarray(weights[name]) for name in sorted(weights)}
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = {_METADATA_KEY: json.dumps(metadata, allow_nan=False)}
    end = 0
    for name, array in arrays.items():
        dtype = "U64" if array.dtype == np.uint64 else "F32"
        begin, end = end, end + (8 if dtype == "U64" else 4) * array.size
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [begin, end]}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    buffer = bytearray(8 + len(encoded) + end)
    buffer[:8] = len(encoded).to_bytes(8, "little")
    buffer[8:8 + len(encoded)] = encoded
    data = np.frombuffer(buffer, dtype=np.uint8, offset=8 + len(encoded))
    for name, array in arrays.items():
        begin, end = header[name]["data_offsets"]
        kind = "<u8" if header[name]["dtype"] == "U64" else "<f4"
        np.copyto(data[begin:end].view(kind).reshape(array.shape), array, casting="same_kind")
    return memoryview(buffer).toreadonly()


def decode_weights(body: bytes) -> tuple[Weights, dict[str, Any]]:
    """(tensors, metadata) from a safetensors body; raises MessageError for anything unreadable."""
    try:
        tensors = dict(load_tensors(body))
        raw = _header(body)[0].get("__metadata__", {}).get(_METADATA_KEY)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        # Any way a body can fail to parse (a dtype numpy lacks, nesting too deep, ...) is the sender's error.
        raise MessageError(f"body is not a readable safetensors result: {type(exc).__name__}: {exc}") from None
    return tensors, _metadata(raw)


def _metadata(raw: str | None) -> dict[str, Any]:
    try:
        metadata = {} if raw is None else json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"result metadata is not JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise MessageError("result metadata must be a JSON object")
    return metadata


# safetensors' dtype names of the arrays numpy can hold (it has no bfloat16 or float8).
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _header(body: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """A safetensors body's header (an 8-byte little-endian length, then JSON) and where its data begins."""
    length = int.from_bytes(body[:8], "little")
    return json.loads(bytes(body[8:8 + length])), 8 + length


def _views(header: Mapping[str, Any], data: np.ndarray) -> Weights:
    """The tensors `header` describes, as views of `data` (the bytes after the header): no copy."""
    tensors: Weights = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in _NUMPY_DTYPES:
            raise MessageError(f"body is not a readable safetensors result: {name} is {spec['dtype']}, "
                               "which numpy cannot hold")
        begin, end = spec["data_offsets"]
        tensors[name] = data[begin:end].view(_NUMPY_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return tensors


def weights_view(body: bytes | memoryview) -> Weights:
    """The tensors of a safetensors body made by `encode_weights`, as read-only views of its bytes."""
    header, data_start = _header(body)
    return _views(header, np.frombuffer(body, dtype=np.uint8, offset=data_start))


def map_result(path: Path) -> TaskResult:
    """A result file's tensors as read-only arrays memory-mapped from it, so that they are read a block at a time
    when used and never held whole in memory (`mapped.blocks`), and its metadata; raises MessageError for anything
    unreadable. safetensors checks the header (every tensor's byte range against its dtype and shape, in the
    file); numpy then views the data where the header says it lies."""
    try:
        with safe_open(path, framework="numpy") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header, data_start = _header(prefix + handle.read(int.from_bytes(prefix, "little")))
        data = map_file(path, data_start)
    except (SafetensorError, OSError, ValueError, RecursionError) as exc:
        raise MessageError(f"body is not a readable safetensors result: {type(exc).__name__}: {exc}") from None
    return TaskResult(_metadata(raw), _views(header, data))


def describe_result(body: bytes) -> dict[str, Any]:
    """What a result body carries, from its header alone (no tensor is copied): each tensor's dtype and shape,
    and the metadata as sent."""
    try:
        header = _header(body)[0]
        raw = header.pop("__metadata__", {}).get(_METADATA_KEY)
        tensors = {name: {"dtype": spec["dtype"], "shape": spec["shape"]} for name, spec in sorted(header.items())}
        return {"tensors": tensors, "metadata": {} if raw is None else json.loads(raw)}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}


# The metadata key naming the task a result answers: a result is bound to its task, so that one replayed for
# another task (the same hospital's next round) is refused, not averaged.
RESULT_TASK_KEY = "task_id"


def encode_result(result: TaskResult, task_id: str) -> bytes:
    """The body of `task_id`'s result."""
    return bytes(encode_weights(result.tensors, {**result.metadata, RESULT_TASK_KEY: task_id}))


def decode_result(body: bytes) -> TaskResult:
    tensors, metadata = decode_weights(body)
    return TaskResult(metadata, tensors)


def check_result_task(result: TaskResult, task_id: str) -> None:
    """Take the task id out of a decoded result's metadata; MessageError unless it is `task_id`."""
    named = result.metadata.pop(RESULT_TASK_KEY, None)
    if named != task_id:
        raise MessageError(f"this result names task {named!r}, not {task_id!r}: a result answers the task it was "
                           "computed for")


class RunRequest(BaseModel):
    """`POST /v1/runs`: a run's configuration and, optionally, which provisioned hospitals take part."""

    model_config = ConfigDict(extra="forbid")

    config: RunConfig = RunConfig()
    hospitals: list[str] | None = Field(None, min_length=1, description="default: every provisioned hospital")

    @field_validator("hospitals")
    @classmethod
    def _each_once(cls, hospitals: list[str] | None) -> list[str] | None:
        if hospitals is not None and len(set(hospitals)) != len(hospitals):
            raise ValueError("each hospital may be named once")
        return hospitals


class TaskMessage(BaseModel):
    """`GET /v1/tasks/next`: one leased task for the calling hospital."""

    id: str
    run_id: str
    round: int
    attempt: int
    kind: TaskKind
    config: RunConfig
    preprocessing: GlobalPreprocessing | None  # the run's global standardisation; None in round 0
    weights_path: str | None  # where to GET the round's global weights (None for `stats`)
    lease_expires: float  # Unix seconds
    lease_s: float

    @classmethod
    def of(cls, task: Task, run: Run) -> TaskMessage:
        weights = None if task.kind is TaskKind.stats else f"/v1/runs/{run.id}/rounds/{task.round}/weights"
        return cls(id=task.id, run_id=run.id, round=task.round, attempt=task.attempt, kind=task.kind,
                   config=run.config, preprocessing=run.preprocessing, weights_path=weights,
                   lease_expires=task.lease_expires, lease_s=run.config.lease_s)


class LeaseMessage(BaseModel):
    task_id: str
    lease_expires: float


class ResultReceipt(BaseModel):
    """The answer to an accepted result."""

    task_id: str
    round: int
    run_round: int  # the run's round after this result (it moves on when the result closed the round)


class RoundView(BaseModel):
    round: int
    kind: TaskKind
    attempts: int
    opened_at: float
    closed_at: float
    hospitals: dict[str, StatsMetadata | FitMetadata | EvaluationMetadata]  # hospital -> its result's metadata
    nodes: dict[str, str]  # hospital -> replica whose result counted
    global_metrics: dict[str, float]  # example-weighted mean over hospitals of the incoming model's metrics
    # A securely aggregated round: the threshold, and who took part in each phase (keys, shares, masked, revealed)
    secure_aggregation: dict[str, Any] | None = None


class OpenTaskView(BaseModel):
    hospital: str
    status: str
    holder: str | None
    lease_expires: float


class HospitalPrivacy(BaseModel):
    epsilon: float  # spent so far
    noise_multiplier: float  # planned for its training rows
    batch_size: int  # its DP-SGD batch (`RunConfig.batch_size_at`)


class PrivacyView(BaseModel):
    """A differentially private run's budget and what it has spent (`fl.privacy_budget.privacy_report`)."""

    epsilon: float  # the largest ε any hospital has spent so far: what the run (and its model) may claim
    delta: float
    budget_epsilon: float
    max_grad_norm: float
    hospitals: dict[str, HospitalPrivacy]


class RunView(BaseModel):
    id: str
    status: str
    reason: str
    round: int
    attempt: int
    final_round: int
    hospitals: list[str]
    config: RunConfig
    # The round whose entering model is the run's (least validation loss over all hospitals; else the last)
    selected_round: int | None = None
    validation_loss: float | None = None  # that model's, when hospitals held validation rows
    preprocessing: GlobalPreprocessing | None  # None until round 0 closes
    rejected: dict[str, int]
    open_tasks: list[OpenTaskView]
    history: list[RoundView]
    model: dict[str, Any] | None = None  # the registry's answer once a completed run's model is registered
    # hospital -> cells its round-0 stats withheld as too small ({"categories": n, "histogram_bins": m})
    suppressed: dict[str, dict[str, int]] = {}
    excluded: dict[str, str] = {}  # hospital -> why it was left out of the run (no training rows)
    privacy: PrivacyView | None = None  # with a privacy budget: what the run has spent


def weighted_metrics(evaluations: Mapping[str, EvaluationMetadata]) -> dict[str, float]:
    """Example-weighted mean of the hospitals' evaluation metrics (what federated evaluation can report
    without pooling predictions)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metadata in evaluations.values():
        examples = float(metadata.num_test_examples)
        for name, value in metadata.metrics.items():
            if examples > 0 and value is not None:
                totals[name] = totals.get(name, 0.0) + examples * float(value)
                weights[name] = weights.get(name, 0.0) + examples
    return {name: totals[name] / weights[name] for name in totals}


# --- secure aggregation (fl/secagg.py's protocol; byte strings travel as base64) ----------------------------------

_BASE64_KEY = Field(min_length=44, max_length=44, description="32 bytes, base64")


def bytes_of(field: str, text: str) -> bytes:
    """A base64 field's bytes; `Invalid` (422) naming the field otherwise."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(f"{field}: not base64") from None


class AdvertisedKeys(BaseModel):
    """A hospital's public keys for one secure round, signed with its consortium certificate's key."""

    model_config = ConfigDict(extra="forbid")

    c_public: str = _BASE64_KEY
    s_public: str = _BASE64_KEY
    signature: str = Field(min_length=1, max_length=200, description="ECDSA-SHA256, DER, base64")
    certificate: str = Field(min_length=1, max_length=8000, description="the hospital's certificate (PEM), issued "
                             "by the consortium CA: what every hospital checks the signature against")


    @classmethod
    def of(cls, advertisement: KeyAdvertisement, certificate_pem: str) -> AdvertisedKeys:
        return cls(c_public=base64_of(advertisement.c_public), s_public=base64_of(advertisement.s_public),
                   signature=base64_of(advertisement.signature), certificate=certificate_pem)

    def advertisement(self, hospital: str) -> KeyAdvertisement:
        return KeyAdvertisement(hospital, bytes_of("c_public", self.c_public), bytes_of("s_public", self.s_public),
                                bytes_of("signature", self.signature))


class HospitalKeys(AdvertisedKeys):
    hospital: str


class SealedShare(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipient: str = Field(max_length=200)
    ciphertext: str = Field(max_length=200, description="AES-GCM, readable by the recipient only; base64")


class SecureShares(BaseModel):
    """`POST /v1/tasks/{id}/secure/shares`: a hospital's shares of its secrets, one sealed to each other hospital."""

    model_config = ConfigDict(extra="forbid")

    shares: list[SealedShare] = Field(max_length=10_000)

    @classmethod
    def of(cls, shares: list[EncryptedShares]) -> SecureShares:
        return cls(shares=[SealedShare(recipient=s.recipient, ciphertext=base64_of(s.ciphertext)) for s in shares])

    def encrypted(self, sender: str) -> list[EncryptedShares]:
        return [EncryptedShares(sender, s.recipient, bytes_of(f"shares.{i}.ciphertext", s.ciphertext))
                for i, s in enumerate(self.shares)]


class ReceivedShare(BaseModel):
    sender: str
    ciphertext: str


class SignedSurvivors(BaseModel):
    """`POST /v1/tasks/{id}/secure/consistency`: a survivor's signature of the list of survivors it was shown."""

    model_config = ConfigDict(extra="forbid")

    signature: str = Field(min_length=1, max_length=200, description="ECDSA-SHA256, DER, base64")

    def signed(self) -> bytes:
        return bytes_of("signature", self.signature)


class SecureRefusal(BaseModel):
    """`POST /v1/tasks/{id}/secure/refuse`: a hospital takes no further part in the round, and says why."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000)


class SecureReveal(BaseModel):
    """`POST /v1/tasks/{id}/secure/reveal`: a hospital's shares of the survivors' self-mask seeds and of the
    dropped hospitals' key seeds, by the hospital they belong to (base64)."""

    model_config = ConfigDict(extra="forbid")

    self_seed_shares: dict[str, str] = Field(max_length=10_000)
    s_key_shares: dict[str, str] = Field(max_length=10_000)

    @classmethod
    def of(cls, reveal: Reveal) -> SecureReveal:
        return cls(self_seed_shares={h: base64_of(v) for h, v in reveal.self_seed_shares.items()},
                   s_key_shares={h: base64_of(v) for h, v in reveal.s_key_shares.items()})

    def reveal(self, hospital: str) -> Reveal:
        return Reveal(hospital, {h: bytes_of(f"self_seed_shares.{h}", v) for h, v in self.self_seed_shares.items()},
                      {h: bytes_of(f"s_key_shares.{h}", v) for h, v in self.s_key_shares.items()})


class SecureRoundView(BaseModel):
    """`GET /v1/tasks/{id}/secure`: a secure round as its task's holder may see it (`SecureRound.view_for`)."""

    phase: SecurePhase
    round: int
    attempt: int
    enrolled: list[str]
    threshold: int  # shares needed to rebuild a secret; the hospitals check it is a majority of the enrolled
    keys: list[HospitalKeys] | None = None  # from the shares phase on: the keys of the hospitals that advertised
    shares: list[ReceivedShare] | None = None  # from the masked phase on: the shares sealed to this hospital
    peers: list[str] | None = None  # from the masked phase on: the hospitals whose shares went out (mask with them)
    survivors: list[str] | None = None  # from the consistency phase on: the hospitals whose masked input arrived
    signatures: dict[str, str] | None = None  # in the reveal phase: the survivors' signatures of that list (base64)
