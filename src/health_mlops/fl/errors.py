"""The coordinator's refusals; the aggregator maps each to its HTTP answer."""

from __future__ import annotations

from health_mlops.errors import FederationError


class CoordinatorError(FederationError):
    """Base of the refusals the service maps to HTTP answers."""


class NotFound(CoordinatorError):
    pass


class Forbidden(CoordinatorError):
    pass


class Conflict(CoordinatorError):
    """A duplicate result, or a result or heartbeat from a replica that no longer holds the lease (409)."""


class Rejected(CoordinatorError):
    """A result that failed validation; `reason` is a short label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Invalid(CoordinatorError):
    """A request that cannot be acted on as asked (422); the text names the field and why."""
