"""A whole federation in one process over real loopback HTTPS: the aggregator service on an ephemeral port and
one node thread per hospital, exactly the code `health-mlops aggregator` and `health-mlops node` run, with
mutual TLS as deployed (or plain HTTP, to measure what TLS costs).

For experiments and benchmarks (`health-mlops train --mode federated`): it measures what the protocol
costs on top of the hospitals' compute. Credentials and checkpoints go to a temporary folder.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from health_mlops.data.hospital import HospitalData
from health_mlops.errors import FederationError
from health_mlops.fl.aggregator import AggregatorService, create_app
from health_mlops.fl.client import AdminClient
from health_mlops.fl.messages import RunRequest, RunView, decode_weights
from health_mlops.fl.node import HospitalNode
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.state import TaskKind
from health_mlops.fl.store import CheckpointStore
from health_mlops.fl.strategies import Weights
from health_mlops.spec import DatasetSpec
from health_mlops.trust.credentials import ADMIN, ClientCredential, Gatekeeper, provision
from health_mlops.trust.pki import CA, SERVER, cert_path, key_path
from health_mlops.trust.tls import server_context
from health_mlops.web.server import BackgroundServer


@dataclass(frozen=True)
class Timing:
    rounds: int  # training rounds
    wall_seconds: float  # from starting the run to its completion
    round_overhead_ms_median: float  # a fit round's wall time minus its slowest hospital's compute

    def to_json(self) -> dict[str, float]:
        return {"rounds": self.rounds, "wall_seconds": round(self.wall_seconds, 3),
                "round_overhead_ms_median": round(self.round_overhead_ms_median, 2)}


def round_overheads_ms(view: RunView) -> list[float]:
    """Per fit round: wall time from opening to closing, minus the slowest hospital's compute."""
    overheads = []
    for record in view.history:
        if record.kind is TaskKind.fit:
            slowest = max(m.compute_seconds for m in record.hospitals.values())
            overheads.append(1000 * (record.closed_at - record.opened_at - slowest))
    return overheads


class RunFailed(FederationError):
    """The run ended without completing (failed or cancelled); the message says why."""


@dataclass
class LoopbackResult:
    run: RunView
    weights: Weights  # the final global model
    timing: Timing


def run_federation_over_loopback(spec: DatasetSpec, hospitals: dict[str, HospitalData], config: RunConfig, *,
                                 split_seed: int, test_fraction: float, stratify: bool = True,
                                 plain_http: bool = False,
                                 on_progress: Callable[[RunView], None] | None = None) -> LoopbackResult:
    """Start the aggregator and a node per hospital, run one training run to its end, stop everything."""
    with tempfile.TemporaryDirectory(prefix="health-mlops-loopback-") as scratch:
        credentials = Path(scratch) / "credentials"
        provision(credentials, list(hospitals))
        gatekeeper = Gatekeeper(credentials, require_certificate=not plain_http)
        tls = None if plain_http else server_context(cert_path(credentials, SERVER), key_path(credentials, SERVER),
                                                     client_ca=cert_path(credentials, CA))
        store = CheckpointStore(Path(scratch) / "models")
        app = create_app(lambda: AggregatorService(spec, store, gatekeeper))
        stop = threading.Event()
        with BackgroundServer(app, tls=tls) as server:
            nodes = [HospitalNode(data=data, spec=spec, node_id=f"{hospital_id}-loopback", city="",
                                  central_url=server.url,
                                  credential=ClientCredential.from_directory(credentials, hospital_id),
                                  split_seed=split_seed, test_fraction=test_fraction, stratify=stratify,
                                  poll_wait_s=2.0)
                     for hospital_id, data in hospitals.items()]
            threads = [threading.Thread(target=n.run, args=(stop,), name=n.hospital_id, daemon=True) for n in nodes]
            for thread in threads:
                thread.start()
            try:
                with AdminClient(server.url, ClientCredential.from_directory(credentials, ADMIN)) as admin:
                    started = time.perf_counter()
                    view = admin.start_run(RunRequest(config=config))
                    while view.status == "running":
                        time.sleep(0.25)  # progress needs no more; each view costs the server time
                        view = admin.run(view.id)
                        if on_progress is not None:
                            on_progress(view)
                    wall = time.perf_counter() - started
                    if view.status != "completed":
                        raise RunFailed(f"the federated run ended {view.status}: {view.reason}")
                    body = admin.round_weights(view.id, view.final_round)
            finally:  # the nodes stop before the server: a long poll in flight ends with its answer, not a 500
                stop.set()
                for thread in threads:
                    thread.join(timeout=5)
                for node in nodes:
                    node.close()
    overheads = round_overheads_ms(view)
    timing = Timing(len(overheads), wall, statistics.median(overheads) if overheads else 0.0)
    return LoopbackResult(view, decode_weights(body)[0], timing)
