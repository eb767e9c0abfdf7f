"""Who is calling: the service, the caller's identity (its token and client certificate together), and the
role an endpoint needs. A refused credential is counted, audited, slowed down per source and answered."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from health_mlops.fl.aggregator.service import AggregatorService
from health_mlops.trust.credentials import AccessDenied, Identity
from health_mlops.trust.tls import peer_certificate

MAX_NODE_ID_LENGTH = 128


async def _service(request: Request) -> AggregatorService:
    service: AggregatorService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, "the aggregator is still loading its checkpoint")
    return service


Service = Annotated[AggregatorService, Depends(_service)]


async def refuse(svc: AggregatorService, request: Request, status: int, reason: str,
                 actor: str | None) -> HTTPException:
    """A refused credential: counted, audited (who it claimed to be, from where, for what), slowed down per
    source when it repeats, and answered."""
    svc.metrics.auth_failures.labels(str(status)).inc()
    source = request.client.host if request.client else "unknown"
    svc.reporting.audit(f"{request.method} {request.url.path}", actor or "unknown", outcome=f"refused {status}",
                        reason=reason, source=source)
    delay = svc.throttle.failed(source, reason)
    if delay:
        await asyncio.sleep(delay)
    return HTTPException(status, reason, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


async def _caller(request: Request, svc: Service, authorization: Annotated[str | None, Header()] = None) -> Identity:
    try:
        identity = svc.gatekeeper.identify(authorization, peer_certificate(request.scope))
    except AccessDenied as denied:
        raise await refuse(svc, request, denied.status, str(denied), denied.claimed) from None
    request.state.actor = identity.name  # who a refusal later in the request is audited against
    return identity


Caller = Annotated[Identity, Depends(_caller)]


async def _hospital(request: Request, svc: Service, identity: Caller) -> str:
    if identity.hospital is None:
        raise await refuse(svc, request, 403, "this endpoint is for hospital nodes; the admin cannot use it",
                           identity.name)
    return identity.hospital


async def _admin(request: Request, svc: Service, identity: Caller) -> Identity:
    if identity.role != "admin":
        raise await refuse(svc, request, 403, "this endpoint needs the admin credential", identity.name)
    return identity


async def _node_id(x_node_id: Annotated[str, Header(min_length=1, max_length=MAX_NODE_ID_LENGTH)] = "node") -> str:
    """The replica's name: tells replicas of one hospital apart; identity comes from the token only."""
    return x_node_id


Hospital = Annotated[str, Depends(_hospital)]
Admin = Annotated[Identity, Depends(_admin)]
NodeId = Annotated[str, Depends(_node_id)]
