"""A secure round's steps, as the replica holding a fit task takes them: its keys, its encrypted shares, its
signature of the survivors, a refusal, its reveal (`fl.secure_round.SecureRound` keeps the round's state). Each
step is the holder's only: the keys are in its memory. After each, the coordinator closes the phase when it can
close, as it closes a plain round when its results are in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from health_mlops.fl.errors import Conflict, Forbidden
from health_mlops.fl.secagg import EncryptedShares, KeyAdvertisement, Reveal
from health_mlops.fl.secure_round import SecureRound
from health_mlops.fl.state import Task, TaskStatus

if TYPE_CHECKING:
    from health_mlops.fl.coordinator import Coordinator


class SecureSteps:
    """The steps of the coordinator's open secure rounds (`Coordinator.secure_steps`)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def _held(self, task_id: str, hospital: str, node: str, now: float) -> tuple[Task, SecureRound]:
        """A secure fit task and its round, for the replica that holds it: a secure round's steps are one
        replica's (the keys are in its memory). After its masked input the task is done, and still its."""
        task = self._coordinator.tasks.get(task_id)
        if task is None:
            raise self._coordinator.unknown_task(task_id, hospital)
        if task.hospital != hospital:
            raise Forbidden(f"task {task_id} belongs to another hospital")
        secure = self._coordinator.secure.get(task.run_id)
        if secure is None or (task.round, task.attempt) != (secure.round, secure.attempt):
            raise Conflict(f"task {task_id} is not in an open secure aggregation round")
        held = task.status is TaskStatus.leased and task.lease_expires > now
        if task.holder != node or not (held or task.status is TaskStatus.done):
            raise Conflict(f"task {task_id}: lease not held by {node} (expired or taken over)")
        return task, secure

    def view(self, task_id: str, hospital: str, node: str, now: float) -> dict[str, Any]:
        """What the holder of a secure fit task needs for its next step (`SecureRound.view_for`)."""
        self._coordinator.tick(now)
        return self._held(task_id, hospital, node, now)[1].view_for(hospital)

    def keys(self, task_id: str, hospital: str, node: str, advertisement: KeyAdvertisement, certificate_pem: str,
             now: float) -> None:
        self._take(task_id, hospital, node, now,
                   lambda secure: secure.add_keys(hospital, advertisement, certificate_pem))

    def shares(self, task_id: str, hospital: str, node: str, shares: list[EncryptedShares], now: float) -> None:
        self._take(task_id, hospital, node, now, lambda secure: secure.add_shares(hospital, shares))

    def consistency(self, task_id: str, hospital: str, node: str, signature: bytes, now: float) -> None:
        self._take(task_id, hospital, node, now, lambda secure: secure.add_signature(hospital, signature))

    def refuse(self, task_id: str, hospital: str, node: str, reason: str, now: float) -> None:
        self._take(task_id, hospital, node, now, lambda secure: secure.add_refusal(hospital, reason))

    def reveal(self, task_id: str, hospital: str, node: str, reveal: Reveal, now: float) -> None:
        self._take(task_id, hospital, node, now, lambda secure: secure.add_reveal(hospital, reveal))

    def _take(self, task_id: str, hospital: str, node: str, now: float, step: Callable[[SecureRound], None]) -> None:
        """The holder's step taken into its round, then the round's open phase closed if it can close."""
        task, secure = self._held(task_id, hospital, node, now)
        step(secure)
        self._coordinator.settle(self._coordinator.runs[task.run_id], now)
