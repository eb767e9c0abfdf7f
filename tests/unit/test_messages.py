"""Wire formats: a result is one safetensors body with its metadata in the header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open


from health_mlops.fl.state import TaskResult
from health_mlops.fl.mapped import mapping_of
from health_mlops.fl.messages import (MessageError, check_result_task, decode_result, encode_result, encode_weights,
                                      map_result, weighted_metrics, weights_view)
from health_mlops.fl.metadata import EvaluationMetadata


def test_a_result_round_trips_with_tensors_and_metadata() -> None:
    tensors = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "layer.bias": np.ones(2, np.float32)}
    metadata = {"num_examples": 120, "metrics": {"auc": 0.81}, "compute_seconds": 0.25}
    decoded = decode_result(encode_result(TaskResult(metadata, tensors), "run-1.r1.a0.hospital-1"))
    check_result_task(decoded, "run-1.r1.a0.hospital-1")
    assert decoded.metadata == metadata
    assert set(decoded.tensors) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(decoded.tensors[name], value)


def test_encoded_weights_are_a_safetensors_body_that_safetensors_reads(tmp_path: Path) -> None:
    weights = {"b.weight": np.arange(12, dtype=np.float64).reshape(3, 4).T,  # float64, not contiguous
               "a.bias": np.array([0.1, -2.5], np.float32), "empty": np.zeros((0, 5), np.float32),
               "scalar": np.float32(3.0)}
    body = bytes(encode_weights(weights, {"round": 2}))
    (tmp_path / "weights.safetensors").write_bytes(body)
    with safe_open(tmp_path / "weights.safetensors", framework="numpy") as handle:
        assert handle.metadata() == {"metadata": '{"round": 2}'}
        assert sorted(handle.keys()) == sorted(weights)
        for name, value in weights.items():
            read = handle.get_tensor(name)
            assert read.dtype == np.float32 and read.shape == np.shape(value)
            np.testing.assert_array_equal(read, np.asarray(value, dtype=np.float32))
    assert int.from_bytes(body[:8], "little") % 8 == 0  # the data 8-byte aligned, as safetensors writes it


def test_a_stats_result_has_metadata_only() -> None:
    decoded = decode_result(encode_result(TaskResult({"count": 10, "sums": [1.0, None]}), "run-1.r0.a0.hospital-1"))
    check_result_task(decoded, "run-1.r0.a0.hospital-1")
    assert decoded.tensors == {} and decoded.metadata == {"count": 10, "sums": [1.0, None]}


def test_a_result_answers_only_the_task_it_was_computed_for() -> None:
    """A round-1 update replayed for the same hospital's round-2 task, or a body naming no task, is refused."""
    update = TaskResult({"num_examples": 7}, {"w": np.ones(3, np.float32)})
    with pytest.raises(MessageError, match="names task 'run-1.r1.a0.hospital-1', not 'run-1.r2.a0.hospital-1'"):
        check_result_task(decode_result(encode_result(update, "run-1.r1.a0.hospital-1")), "run-1.r2.a0.hospital-1")
    with pytest.raises(MessageError, match="names task None"):
        check_result_task(decode_result(bytes(encode_weights(update.tensors, update.metadata))),
                          "run-1.r2.a0.hospital-1")


@pytest.mark.parametrize("body", [b"", b"not a safetensors file", b"\xff" * 16])
def test_unreadable_bodies_are_message_errors(body: bytes) -> None:
    with pytest.raises(MessageError):
        decode_result(body)


def test_federated_metrics_are_weighted_by_test_examples() -> None:
    hospitals = {"a": EvaluationMetadata(num_examples=300, num_test_examples=300, metrics={"auc": 0.9, "brier": None}),
                 "b": EvaluationMetadata(num_examples=100, num_test_examples=100, metrics={"auc": 0.5, "brier": 0.2})}
    assert weighted_metrics(hospitals) == pytest.approx({"auc": 0.8, "brier": 0.2})  # undefined counts nowhere


def test_a_result_file_is_read_memory_mapped_with_its_metadata(tmp_path: Path) -> None:
    tensors = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros(0, np.float32),
               "layer.bias": np.array([0.5, -1.25])}
    path = tmp_path / "result.safetensors"
    path.write_bytes(encode_result(TaskResult({"num_examples": 7}, tensors), "run-1.r1.a0.hospital-1"))
    mapped = map_result(path)
    assert mapped.metadata == {"num_examples": 7, "task_id": "run-1.r1.a0.hospital-1"}
    for name, value in tensors.items():
        assert mapped.tensors[name].dtype == np.float32 and mapped.tensors[name].shape == value.shape
        np.testing.assert_array_equal(mapped.tensors[name], value.astype(np.float32))
    assert mapping_of(mapped.tensors["layer.weight"]) is not None  # read from the file when used, not loaded
    assert not mapped.tensors["layer.weight"].flags.writeable


@pytest.mark.parametrize("body", [b"", b"not a safetensors file", b"\xff" * 16])
def test_unreadable_result_files_are_message_errors(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "result.safetensors"
    path.write_bytes(body)
    with pytest.raises(MessageError):
        map_result(path)


def test_a_result_file_cut_short_is_a_message_error(tmp_path: Path) -> None:
    body = encode_result(TaskResult({"num_examples": 7}, {"w": np.ones(1000, np.float32)}), "run-1.r1.a0.hospital-1")
    path = tmp_path / "result.safetensors"
    path.write_bytes(body[:len(body) - 1])
    with pytest.raises(MessageError):
        map_result(path)


def test_the_global_weights_are_viewed_in_their_encoded_body_without_a_copy() -> None:
    weights = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0, 3), np.float32)}
    body = encode_weights(weights)
    viewed = weights_view(body)
    for name, value in weights.items():
        np.testing.assert_array_equal(viewed[name], value)
        assert viewed[name].shape == value.shape and not viewed[name].flags.writeable
    assert np.shares_memory(viewed["layer.weight"], np.frombuffer(body, dtype=np.uint8))
