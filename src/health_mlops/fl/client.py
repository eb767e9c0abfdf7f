"""The one client of the aggregator's protocol. Hospital nodes use `HospitalClient`; the demo, `start-run`, the
dashboard's federation view and the loopback harness use `AdminClient`. Paths, credentials and timeouts live
here and nowhere else, so that transport security is decided in one place: an `https://` aggregator is
verified against the consortium CA and shown the client's certificate (mutual TLS); `http://` is plain, for
an aggregator started with `--plain-http` on loopback.

Errors are httpx's: `httpx.TransportError` when the aggregator cannot be reached, `httpx.HTTPStatusError` for
an answer other than the expected one; `submit_result` and `heartbeat` return the status instead, because a
node acts on each refusal differently. A refused run is `RunRefused`, with the aggregator's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import httpx
from pydantic import BaseModel

from health_mlops.errors import FederationError
from health_mlops.fl.messages import SAFETENSORS_MEDIA_TYPE, RunRequest, RunView, SecureRoundView, TaskMessage
from health_mlops.trust.credentials import ClientCredential, bearer
from health_mlops.trust.tls import client_context, follow_crl

ADMIN_TIMEOUT_S = 30.0
# A request that is not a long poll gets this long to connect, send and answer.
REQUEST_TIMEOUT_S = 10.0


class RunRefused(FederationError):
    """The aggregator would not start a run; the message has its status and reason."""


class _AggregatorClient:
    def __init__(self, base_url: str, credential: ClientCredential, *, timeout: httpx.Timeout | float,
                 headers: dict[str, str] | None = None,
                 on_request: Callable[[httpx.Request], None] | None = None,
                 on_response: Callable[[httpx.Response], None] | None = None) -> None:
        hooks: dict[str, list[Callable[..., Any]]] = {"request": [on_request] if on_request else [],
                                                      "response": [on_response] if on_response else []}
        # The TLS context every new connection's handshake uses; with the consortium's CRL, kept current while
        # this client lives (a node runs for months: an aggregator certificate revoked meanwhile must fail too).
        self.tls = (client_context(credential.certificate, credential.key, credential.ca, crl=credential.crl)
                    if base_url.startswith("https://") else None)
        self._crl_follower = follow_crl(self.tls, credential.crl) if self.tls and credential.crl else None
        self._http = httpx.Client(base_url=base_url, headers={**bearer(credential.token), **(headers or {})},
                                  timeout=timeout, event_hooks=hooks, verify=self.tls or True)

    def close(self) -> None:
        if self._crl_follower is not None:
            self._crl_follower.set()
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class HospitalClient(_AggregatorClient):
    """A node's calls: who am I, the next task (long poll), a round's weights, heartbeats and results.
    `on_request` sees every request as it is sent (the node keeps a list of what left the hospital);
    `on_response` every answer (the node counts any answer as the aggregator being reachable)."""

    def __init__(self, base_url: str, credential: ClientCredential, *, node_id: str, poll_wait_s: float,
                 on_request: Callable[[httpx.Request], None] | None = None,
                 on_response: Callable[[httpx.Response], None] | None = None) -> None:
        super().__init__(base_url, credential, headers={"X-Node-Id": node_id}, on_request=on_request,
                         on_response=on_response,
                         timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=poll_wait_s + REQUEST_TIMEOUT_S))
        self.poll_wait_s = poll_wait_s

    def whoami(self) -> str | None:
        """The hospital this credential belongs to (None: the admin's)."""
        return self._http.get("/v1/whoami").raise_for_status().json().get("hospital")

    def next_task(self) -> TaskMessage | None:
        """Waits up to `poll_wait_s` for a task; None when there is none."""
        response = self._http.get("/v1/tasks/next", params={"wait": self.poll_wait_s})
        if response.status_code == 204:
            return None
        return TaskMessage.model_validate(response.raise_for_status().json())

    def weights(self, path: str) -> bytes:
        """A round's global weights, at the path its task names."""
        return self._http.get(path).raise_for_status().content

    def submit_result(self, task_id: str, body: bytes) -> httpx.Response:
        return self._http.post(f"/v1/tasks/{task_id}/result", content=body,
                               headers={"Content-Type": SAFETENSORS_MEDIA_TYPE})

    def heartbeat(self, task_id: str) -> int:
        return self._http.post(f"/v1/tasks/{task_id}/heartbeat").status_code

    def secure_round(self, task_id: str, *, after: str | None = None) -> SecureRoundView:
        """A secure round as this replica may see it; with `after`, waits up to `poll_wait_s` for the round to
        leave that phase."""
        params: dict[str, str | float] = {} if after is None else {"after": after, "wait": self.poll_wait_s}
        response = self._http.get(f"/v1/tasks/{task_id}/secure", params=params)
        return SecureRoundView.model_validate(response.raise_for_status().json())

    def secure_send(self, task_id: str, step: str, body: BaseModel) -> None:
        """Send a secure round's `keys`, `shares`, `consistency` (the signed survivors) or `reveal`."""
        self._http.post(f"/v1/tasks/{task_id}/secure/{step}", json=body.model_dump()).raise_for_status()


class AdminClient(_AggregatorClient):
    """The consortium admin's calls: start, follow and cancel runs, fetch a run's final weights."""

    def __init__(self, base_url: str, credential: ClientCredential, *, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        super().__init__(base_url, credential, timeout=timeout_s)

    def start_run(self, request: RunRequest) -> RunView:
        response = self._http.post("/v1/runs", json=request.model_dump(mode="json"))
        if response.status_code != 201:
            raise RunRefused(f"the aggregator refused the run ({response.status_code}): {response.text}")
        return RunView.model_validate(response.json())

    def run(self, run_id: str) -> RunView:
        return RunView.model_validate(self._http.get(f"/v1/runs/{run_id}").raise_for_status().json())

    def runs(self) -> list[dict[str, Any]]:
        """Every run the aggregator holds, as the JSON views it sends."""
        return self._http.get("/v1/runs").raise_for_status().json()

    def cancel(self, run_id: str) -> None:
        self._http.post(f"/v1/runs/{run_id}/cancel").raise_for_status()

    def round_weights(self, run_id: str, round_number: int) -> bytes:
        return self._http.get(f"/v1/runs/{run_id}/rounds/{round_number}/weights").raise_for_status().content
