"""The aggregator's durable state: the coordinator's snapshot and each closed round's global weights. The store
is what a restore reads beside the snapshot (`fl.snapshot.SavedState`).

Every write is atomic (write a temporary file, fsync it, rename it over the old one, fsync the folder), so a
crash at any instant leaves either the previous checkpoint or the new one, never a torn file. Layout under
the models directory:

    aggregator/state.json                       the coordinator's running runs (tasks, accepted results' metadata
                                                and file names), rewritten at every accepted result and round
                                                change; it grows neither with rounds closed nor runs completed
    runs/<run id>/results/<name>.safetensors    a fit result, as the hospital sent it: streamed to disk as it
                                                arrives and durable before it is offered to the coordinator (which
                                                reads it memory-mapped), removed once no durable state names it
                                                (so a checkpoint costs O(model) per result, not O(N·model))
    runs/<run id>/round-<r>.safetensors         global weights entering round r (kept for every round)
    runs/<run id>/round-<r>.optimiser.safetensors  FedAdam/FedYogi's moments entering round r
    runs/<run id>/history.jsonl                 a running run's closed rounds, one line each, appended once (the
                                                state says how many lines are its own: a line appended before a
                                                crash cut the state's write short is dropped at the restart)
    runs/<run id>/registration.json             the registry's answer for the run's final model
    runs/<run id>/run.json                      an ended run's record (settings, history, outcome), written
                                                before the state that no longer holds it

An ended run is compacted once the state without it is durable: only its record, its last round's weights (a
completed run's final model) and its registration stay.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any, BinaryIO

from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors

from health_mlops.errors import CheckpointError
from health_mlops.fl.messages import MessageError, encode_weights, map_result
from health_mlops.fl.state import Task
from health_mlops.system.faults import crash_point
from health_mlops.system.files import (append_private, commit_atomically, open_atomically, temporary_path,
                                       write_atomically)

Weights = dict[str, Any]  # name -> numpy array
_FIRST, _SECOND = "first/", "second/"  # tensor name prefixes of the optimiser's moments in one file


class CheckpointStore:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.state_path = models_dir / "aggregator" / "state.json"

    def lock(self) -> None:
        """Hold the models directory for this process's lifetime: a second aggregator on it would overwrite
        the first one's checkpoints."""
        path = self.state_path.parent / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(path, "w")  # noqa: SIM115 - held open (and locked) until the process exits
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"{self.models_dir}: another aggregator is using this models directory") from None

    def save_state(self, snapshot: dict[str, Any]) -> int:
        """Write the coordinator's snapshot; the bytes written."""
        body = json.dumps(snapshot, separators=(",", ":")).encode("utf-8")
        write_atomically(self.state_path, body, before_rename=lambda: crash_point("checkpoint_unrenamed"))
        return len(body)

    def load_state(self) -> dict[str, Any] | None:
        """The last checkpoint, or None on a first start."""
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.state_path}: cannot read the aggregator's checkpoint ({exc}); "
                                  "restore it from a backup or move it aside to start afresh") from None
        if not isinstance(state, dict) or not {"runs", "tasks", "results"} <= set(state):
            raise CheckpointError(f"{self.state_path}: not an aggregator checkpoint")
        return state

    def weights_path(self, run_id: str, round_number: int) -> Path:
        return self.models_dir / "runs" / run_id / f"round-{round_number}.safetensors"

    def save_weights(self, run_id: str, round_number: int, body: bytes | memoryview) -> None:
        write_atomically(self.weights_path(run_id, round_number), body)

    def result_path(self, run_id: str, reference: str) -> Path:
        return self.models_dir / "runs" / run_id / "results" / f"{reference}.safetensors"

    def open_result(self, run_id: str, reference: str) -> BinaryIO:
        """A result file to write as its body arrives; it exists once `commit_result` returns."""
        return open_atomically(self.result_path(run_id, reference))

    def commit_result(self, run_id: str, reference: str, handle: BinaryIO) -> int:
        """Make a result written through `open_result` durable and put it in place; its size in bytes."""
        size = handle.tell()
        commit_atomically(handle, self.result_path(run_id, reference))
        return size

    def remove_result(self, run_id: str, reference: str) -> None:
        path = self.result_path(run_id, reference)
        path.unlink(missing_ok=True)
        temporary_path(path).unlink(missing_ok=True)

    def result_references(self) -> set[tuple[str, str]]:
        """Every result file, as (run id, reference), those cut short in writing included."""
        return {(path.parent.parent.name, path.name.removeprefix(".").removesuffix(".tmp").removesuffix(".safetensors"))
                for pattern in ("*/results/*.safetensors", "*/results/.*.safetensors.tmp")
                for path in (self.models_dir / "runs").glob(pattern)}

    def run_record_path(self, run_id: str) -> Path:
        return self.models_dir / "runs" / run_id / "run.json"

    def save_run_record(self, run_id: str, record: dict[str, Any]) -> int:
        """An ended run's record; the bytes written."""
        body = json.dumps(record, separators=(",", ":")).encode("utf-8")
        write_atomically(self.run_record_path(run_id), body)
        return len(body)

    def ended_runs(self) -> list[dict[str, Any]]:
        """Every ended run's record."""
        records = []
        for path in sorted((self.models_dir / "runs").glob("*/run.json")):
            try:
                records.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot read an ended run's record ({exc}); restore it from a "
                                      "backup or move its run folder aside") from None
        return records

    def history_path(self, run_id: str) -> Path:
        return self.models_dir / "runs" / run_id / "history.jsonl"

    def append_history(self, run_id: str, records: list[dict[str, Any]]) -> int:
        """Closed rounds' records, appended durably; the bytes written."""
        body = b"".join(json.dumps(r, separators=(",", ":")).encode("utf-8") + b"\n" for r in records)
        append_private(self.history_path(run_id), body)
        return len(body)

    def round_history(self, run_id: str, rounds: int) -> list[dict[str, Any]]:
        """A running run's first `rounds` closed rounds. Lines beyond them (appended before a crash cut short the
        state that would count them) are cut off the file, so that appends continue after the state's last."""
        path = self.history_path(run_id)
        if rounds == 0:
            path.unlink(missing_ok=True)
            return []
        try:
            with open(path, "r+b") as handle:
                lines = [handle.readline() for _ in range(rounds)]
                if not all(line.endswith(b"\n") for line in lines):
                    raise ValueError(f"fewer than the {rounds} whole lines the checkpoint counts")
                handle.truncate(handle.tell())
            return [json.loads(line) for line in lines]
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read the run's closed rounds ({exc})") from None

    def compact_run(self, run_id: str, last_round: int) -> None:
        """Remove what an ended run no longer needs: weights and optimiser moments of every round but its last,
        and result files."""
        folder = self.models_dir / "runs" / run_id
        for path in [*folder.glob("round-*.safetensors"), *folder.glob("results/*"), *folder.glob("results/.*"),
                     self.history_path(run_id)]:
            if path != self.weights_path(run_id, last_round):
                path.unlink(missing_ok=True)
        if (folder / "results").is_dir():
            (folder / "results").rmdir()

    def registration_path(self, run_id: str) -> Path:
        return self.models_dir / "runs" / run_id / "registration.json"

    def save_registration(self, run_id: str, outcome: dict[str, Any]) -> None:
        write_atomically(self.registration_path(run_id), json.dumps(outcome).encode("utf-8"))

    def load_registration(self, run_id: str) -> dict[str, Any] | None:
        path = self.registration_path(run_id)
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        except ValueError:
            return None  # torn by hand: register again

    def optimiser_path(self, run_id: str, round_number: int) -> Path:
        return self.models_dir / "runs" / run_id / f"round-{round_number}.optimiser.safetensors"

    def save_optimiser(self, run_id: str, round_number: int, first: Weights, second: Weights) -> int:
        """The server optimiser's moments entering a round; the bytes written."""
        body = encode_weights({**{f"{_FIRST}{k}": v for k, v in first.items()},
                                 **{f"{_SECOND}{k}": v for k, v in second.items()}})
        write_atomically(self.optimiser_path(run_id, round_number), body)
        return len(body)

    def load_optimiser(self, run_id: str, round_number: int) -> tuple[Weights, Weights]:
        """(first, second) moments entering a round; empty before the optimiser's first step."""
        path = self.optimiser_path(run_id, round_number)
        if not path.exists():
            return {}, {}
        try:
            tensors = load_tensors(path.read_bytes())
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot read the server optimiser's state ({exc})") from None
        return ({k.removeprefix(_FIRST): v for k, v in tensors.items() if k.startswith(_FIRST)},
                {k.removeprefix(_SECOND): v for k, v in tensors.items() if k.startswith(_SECOND)})

    def round_arrays(self, run_id: str, round_number: int) -> tuple[Weights, Weights, Weights]:
        """A running run's weights (memory-mapped from their file) and server optimiser moments entering a round."""
        path = self.weights_path(run_id, round_number)
        if not path.exists():
            raise CheckpointError(f"{path}: missing, and the checkpoint resumes {run_id} at round {round_number}")
        return (map_result(path).tensors, *self.load_optimiser(run_id, round_number))

    def result_tensors(self, task: Task, reference: str) -> Weights:
        """An accepted result's tensors, memory-mapped from its file."""
        path = self.result_path(task.run_id, reference)
        try:
            return map_result(path).tensors
        except MessageError as error:
            raise CheckpointError(f"{path}: an accepted result the checkpoint names cannot be read "
                                  f"({error})") from None

    def load_weights(self, run_id: str, round_number: int) -> bytes | None:
        path = self.weights_path(run_id, round_number)
        return path.read_bytes() if path.exists() else None

    def open_weights(self, run_id: str, round_number: int) -> BinaryIO | None:
        """A round's weights file opened for reading, or None if it is not kept."""
        try:
            return open(self.weights_path(run_id, round_number), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            return None
