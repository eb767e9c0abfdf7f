"""The edge holds, tried as an attacker would against the real processes: bodies of a gigabyte, a batch of a
million empty rows, aborted uploads, and connections that never send a request. Memory is measured on the
server process itself (its peak resident set, reset before each attempt)."""

from __future__ import annotations

import functools
import os
import re
import select
import signal
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from health_mlops.data.synthetic import generate_dataset
from health_mlops.demo.processes import Processes, wait_ready
from health_mlops.serving.access_edge import SESSION_COOKIE
from health_mlops.trust.access import ACCOUNTS_FILE_NAME, issue_key, set_user
from health_mlops.trust.credentials import ADMIN, bearer, provision, read_token, token_path
from health_mlops.trust.pki import CA, cert_path, key_path
from health_mlops.trust.tls import client_context
from tests.conftest import free_port_range, run_cli

PASSWORD = "a clinician's passphrase"

# One aggregator and dashboard for the module (`services`): its tests run on one xdist worker.
pytestmark = [pytest.mark.process, pytest.mark.xdist_group("edge")]

GIB = 1024**3
MIB = 1024**2
CHUNK = 256 * 1024


@dataclass
class Services:
    home: Path
    processes: Processes
    aggregator_port: int
    dashboard_port: int
    api_key: dict[str, str]  # a clinician's API key, for /api/v1
    session: dict[str, str]  # a clinician's session cookie, for the dashboard's Gradio routes
    node_port: int  # hospital-3's node: its API; its metrics port is the next

    def pid(self, name: str) -> int:
        return self.processes.children[name].process.pid

    def tls(self, holder: str) -> ssl.SSLContext:
        credentials = self.home / "credentials"
        return client_context(cert_path(credentials, holder), key_path(credentials, holder),
                              cert_path(credentials, CA))

    def token(self, holder: str) -> str:
        return read_token(token_path(self.home / "credentials", holder))


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    home = tmp_path_factory.mktemp("edge") / "home"
    provision(home / "credentials", ["hospital-1", "hospital-2", "hospital-3"])
    accounts = home / "credentials" / ACCOUNTS_FILE_NAME
    set_user(accounts, "cleo", "clinician", PASSWORD)
    key = issue_key(accounts, "lab-system", "clinician")
    base = free_port_range(5)
    data = home / "data"
    generate_dataset(data, n_hospitals=1, rows_per_hospital=300, seed=3, split_seed=42, test_fraction=0.2)
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(home), "HEALTH_MLOPS_AGGREGATOR_URL": f"https://127.0.0.1:{base}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with Processes(home / "logs", env) as processes:
        aggregator = processes.start("aggregator", ["aggregator", "--port", str(base), "--ops-port", str(base + 1)])
        dashboard = processes.start("dashboard", ["dashboard", "--port", str(base + 2)])
        wait_ready(f"http://127.0.0.1:{base + 1}/readyz", aggregator)
        # hospital-3's node: in no run of these tests (they take hospital-1's and hospital-2's tasks themselves).
        node = processes.start("node", ["node", "--hospital-id", "hospital-3", "--node-id", "hospital-3-a",
                                        "--data-dir", str(data / "hospital-1"), "--central-url",
                                        f"https://127.0.0.1:{base}", "--api-port", str(base + 3),
                                        "--metrics-port", str(base + 4)])
        wait_ready(f"http://127.0.0.1:{base + 3}/readyz", node, timeout_s=180)
        wait_ready(f"http://127.0.0.1:{base + 2}/readyz", dashboard, timeout_s=180)
        login = httpx.post(f"http://127.0.0.1:{base + 2}/login", data={"username": "cleo", "password": PASSWORD})
        assert login.status_code == 303, login.text
        yield Services(home, processes, base, base + 2, {"X-API-Key": key},
                       {"Cookie": f"{SESSION_COOKIE}={login.cookies[SESSION_COOKIE]}"}, base + 3)


def peak_growth_mb(pid: int, attempt: Callable[[], object]) -> tuple[object, float]:
    """What `attempt` returns, and how far the process's resident set rose above where it was, at its peak."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident set
    before = _status_kib(pid, "VmRSS")
    outcome = attempt()
    return outcome, (_status_kib(pid, "VmHWM") - before) / 1024


def _status_kib(pid: int, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def stream_post(port: int, path: str, headers: dict[str, str], *, tls: ssl.SSLContext | None = None,
                total: int = GIB, declared: bool = False, first: bytes = b"", stop_after: int | None = None) -> int:
    """POST up to `total` bytes (chunked, or with a declared Content-Length) until the server answers; its status.
    `stop_after`: close the connection after that many bytes instead, as a client that goes away (status 0)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
    framing = {"Content-Length": str(total)} if declared else {"Transfer-Encoding": "chunked"}
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", **framing, **headers}.items())
    answer: bytes | None = None
    try:
        connection.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        sent, chunk = 0, first or b"x" * CHUNK
        while sent < total and not answer:
            if stop_after is not None and sent >= stop_after:
                return 0
            answer = _available(connection)
            if not answer:
                connection.sendall(chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                chunk = b"x" * CHUNK
    except OSError:
        pass  # the server stopped reading and closed: its answer was sent first
    try:
        answer = answer or connection.recv(4096)
    finally:
        connection.close()
    return int(answer.split(b" ", 2)[1])


def _available(connection: socket.socket) -> bytes | None:
    """What the server has sent so far, without waiting (a TLS session ticket is not an answer)."""
    if not select.select([connection], [], [], 0)[0]:
        return None
    connection.setblocking(False)
    try:
        return connection.recv(4096) or None
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    finally:
        connection.settimeout(60)


def test_a_gigabyte_to_the_aggregator_is_refused_with_its_memory_flat(services: Services) -> None:
    pid, port, admin = services.pid("aggregator"), services.aggregator_port, services.tls(ADMIN)
    token = {"Authorization": f"Bearer {services.token(ADMIN)}", "Content-Type": "application/json"}
    attempts = {
        "no token": lambda: stream_post(port, "/v1/runs", {}, tls=admin),
        "admin, streamed": lambda: stream_post(port, "/v1/runs", token, tls=admin),
        "admin, declared": lambda: stream_post(port, "/v1/runs", token, tls=admin, declared=True),
    }
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=services.tls("hospital-1"),
                      headers=bearer(services.token("hospital-1"))) as hospital:
        run = httpx.post(f"https://127.0.0.1:{port}/v1/runs", headers=bearer(services.token(ADMIN)), verify=admin,
                         json={"hospitals": ["hospital-1", "hospital-2"], "config": {"min_hospitals": 2}})
        assert run.status_code == 201, run.text
        task = hospital.get("/v1/tasks/next").json()["id"]
    attempts["hospital, its own task's result"] = lambda: stream_post(
        port, f"/v1/tasks/{task}/result", bearer(services.token("hospital-1")), tls=services.tls("hospital-1"))
    outcomes = {name: peak_growth_mb(pid, attempt) for name, attempt in attempts.items()}
    assert {name: status for name, (status, _) in outcomes.items()} == {
        "no token": 401, "admin, streamed": 413, "admin, declared": 413, "hospital, its own task's result": 413}
    assert {name: growth for name, (_, growth) in outcomes.items() if growth >= 100} == {}


def test_a_gigabyte_to_the_dashboard_is_refused_with_its_memory_flat(services: Services) -> None:
    pid, port = services.pid("dashboard"), services.dashboard_port
    json_body = {"Content-Type": "application/json"}
    api, ui = {**json_body, **services.api_key}, {**json_body, **services.session}
    part = (b'--B\r\nContent-Disposition: form-data; name="files"; filename="batch.csv"\r\n'
            b"Content-Type: text/csv\r\n\r\n")
    attempts = {
        "/api/v1/predict": lambda: stream_post(port, "/api/v1/predict", api),
        "/api/v1/predict/batch": lambda: stream_post(port, "/api/v1/predict/batch", api),
        "/api/v1/predict/batch, declared": lambda: stream_post(port, "/api/v1/predict/batch", api, declared=True),
        "/gradio_api/upload": lambda: stream_post(port, "/gradio_api/upload", {
            "Content-Type": "multipart/form-data; boundary=B", **services.session}, first=part),
        "/gradio_api/queue/join": lambda: stream_post(port, "/gradio_api/queue/join", ui),
        "/login": lambda: stream_post(port, "/login", {"Content-Type": "application/x-www-form-urlencoded"}),
        "/api/v1/predict/batch, no key": lambda: stream_post(port, "/api/v1/predict/batch", json_body),
        "/gradio_api/upload, no session": lambda: stream_post(port, "/gradio_api/upload", json_body),
    }
    outcomes = {name: peak_growth_mb(pid, attempt) for name, attempt in attempts.items()}
    assert {name: status for name, (status, _) in outcomes.items()} == {
        **dict.fromkeys(attempts, 413), "/api/v1/predict/batch, no key": 401, "/gradio_api/upload, no session": 401}
    assert {name: growth for name, (_, growth) in outcomes.items() if growth >= 100} == {}


def test_a_million_empty_rows_get_a_short_422_while_health_checks_keep_answering(services: Services) -> None:
    port, pid = services.dashboard_port, services.pid("dashboard")
    body = b'{"rows": [' + b",".join([b"{}"] * 1_000_000) + b"]}"
    health: list[int] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while not done.is_set():
                health.append(client.get("/healthz").status_code)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        response, growth = peak_growth_mb(pid, lambda: httpx.post(
            f"http://127.0.0.1:{port}/api/v1/predict/batch", content=body,
            headers={"Content-Type": "application/json", **services.api_key}, timeout=120))
    finally:
        done.set()
        prober.join()
    assert isinstance(response, httpx.Response)
    assert response.status_code == 422 and "at most 200000 rows" in response.text
    assert len(response.content) < 1000  # names the field, echoes nothing
    assert growth < 200
    assert health and set(health) == {200}


def test_invalid_rows_are_named_without_their_values(services: Services) -> None:
    rows = [{"age": 1234.5678, "sex": "secret-value"} for _ in range(5000)]
    response = httpx.post(f"http://127.0.0.1:{services.dashboard_port}/api/v1/predict/batch", json={"rows": rows},
                          headers=services.api_key, timeout=60)
    assert response.status_code == 422
    assert "1234.5678" not in response.text and "secret-value" not in response.text
    errors = response.json()["detail"]
    assert {e["loc"][2] for e in errors if len(e["loc"]) > 2} == set(range(20))  # the first 20 invalid rows
    assert errors[-1]["type"] == "too_many_invalid_rows"


def test_a_client_that_goes_away_is_one_info_line_and_idle_connections_are_closed(services: Services) -> None:
    log = services.processes.children["dashboard"].log_path
    before = log.read_text()
    for _ in range(5):  # uploads abandoned half-way
        assert stream_post(services.dashboard_port, "/api/v1/predict/batch",
                           {"Content-Type": "application/json", **services.api_key},
                           total=8 * MIB, declared=True, stop_after=2 * MIB) == 0
    deadline = time.monotonic() + 30
    while (added := log.read_text()[len(before):]).count("went away") < 5:
        assert time.monotonic() < deadline, added
        time.sleep(0.1)
    assert "Traceback" not in added and "ERROR" not in added
    idle = socket.create_connection(("127.0.0.1", services.dashboard_port), timeout=120)
    try:
        assert idle.recv(1) == b""  # closed by the server; no request was ever sent
    finally:
        idle.close()


def endless_head(port: int, *, tls: ssl.SSLContext | None = None, many_headers: bool = False,
                 second: bool = False) -> bytes:
    """A request head that never ends (one header value growing to 256 MiB, or headers by the million) until the
    server answers; what it answered first. `second`: as the second request of a kept-alive connection."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
    chunk = b"X-A: b\r\n" * (CHUNK // 8) if many_headers else b"a" * CHUNK
    answer: bytes | None = None
    try:
        if second:
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            read_answer(connection)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (b"" if many_headers else b"X-Big: "))
        sent = 0
        while sent < 256 * MIB and not answer:
            answer = _available(connection)
            if not answer:
                connection.sendall(chunk)
                sent += len(chunk)
    except OSError:
        pass  # the server answered and closed
    try:
        return answer or connection.recv(4096)
    finally:
        connection.close()


def read_answer(connection: socket.socket) -> bytes:
    """One whole answer (its head, then as many body bytes as its Content-Length says)."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += connection.recv(4096)
    return head


def test_a_256_mib_request_head_gets_431_with_memory_flat_on_every_server(services: Services) -> None:
    """256 MiB of headers grew each server by gigabytes; now each answers 431 within 64 KiB of head (plus one read)
    and keeps answering its health check."""
    admin = services.tls(ADMIN)  # the mutual-TLS API: a client certificate, no token
    ops = f"http://127.0.0.1:{services.aggregator_port + 1}/healthz"
    dashboard = f"http://127.0.0.1:{services.dashboard_port}/healthz"
    node = f"http://127.0.0.1:{services.node_port}/healthz"
    servers = {"aggregator API": (services.pid("aggregator"), services.aggregator_port, admin, ops),
               "aggregator ops": (services.pid("aggregator"), services.aggregator_port + 1, None, ops),
               "node API": (services.pid("node"), services.node_port, None, node),
               "node metrics": (services.pid("node"), services.node_port + 1, None, node),
               "dashboard": (services.pid("dashboard"), services.dashboard_port, None, dashboard)}
    for name, (pid, port, tls, health) in servers.items():
        for many_headers, second in ((False, False), (True, False), (False, True)):
            attack = functools.partial(endless_head, port, tls=tls, many_headers=many_headers, second=second)
            answer, growth = peak_growth_mb(pid, attack)
            assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 431 "), (name, second, answer[:200])
            assert growth < 100, (name, many_headers, second, growth)
        assert httpx.get(health).status_code == 200, name


def closed_while_trickling(port: int, first: bytes, trickle: bytes, *, tls: ssl.SSLContext | None = None) -> bool:
    """Whether the server closes the connection while `trickle` comes a byte a second after `first` (60 s at most,
    six times the server's limit: the bound is the test's safety, not a timing)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
    try:
        connection.sendall(first)
        for byte in trickle[:60]:
            try:
                if select.select([connection], [], [], 1.0)[0] and _read_to_end(connection):
                    return True  # what it read ended with the end of the connection
                connection.sendall(bytes([byte]))
            except OSError:
                return True
        return False
    finally:
        connection.close()


def _read_to_end(connection: socket.socket) -> bool:
    """Reads what is there (an answer to the first request); whether the connection then ended."""
    try:
        return connection.recv(65536) == b""
    except ssl.SSLWantReadError:  # a TLS record not yet whole (a session ticket): nothing to read yet
        return False


def test_a_slow_second_request_and_a_slow_body_are_closed_on_every_server(services: Services) -> None:
    """The head deadline holds for every request on a kept-alive connection, not only its first, and a body must
    keep coming: on the dashboard, the aggregator's API and operations port, and the node's API and metrics port
    (each attempt in a thread of its own: the servers' deadlines run side by side)."""
    whole = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    slow = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X" * 100
    metrics = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    admin = services.tls(ADMIN)
    def upload(path: str, credential: str) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{credential}\r\n"
                "Content-Length: 1000000\r\n\r\n").encode()

    dashboard_upload = upload("/api/v1/predict/batch", f"X-API-Key: {services.api_key['X-API-Key']}")
    run_request = upload("/v1/runs", f"Authorization: Bearer {services.token(ADMIN)}")
    attempts = {
        "dashboard, second request": lambda: closed_while_trickling(services.dashboard_port, whole, slow),
        "dashboard, body": lambda: closed_while_trickling(services.dashboard_port, dashboard_upload,
                                                          b'{"rows": [' + b" " * 100),
        "aggregator API, second request": lambda: closed_while_trickling(services.aggregator_port, whole, slow,
                                                                         tls=admin),
        "aggregator API, body": lambda: closed_while_trickling(services.aggregator_port, run_request,
                                                               b'{"hospitals": [' + b" " * 100, tls=admin),
        "aggregator ops, second request": lambda: closed_while_trickling(services.aggregator_port + 1, whole, slow),
        "node API, second request": lambda: closed_while_trickling(services.node_port, whole, slow),
        "node metrics, second request": lambda: closed_while_trickling(services.node_port + 1, metrics, slow),
    }
    with ThreadPoolExecutor(len(attempts)) as pool:
        closed = {name: future.result() for name, future in
                  [(name, pool.submit(attempt)) for name, attempt in attempts.items()]}
    assert closed == dict.fromkeys(attempts, True)


def test_a_revoked_certificate_fails_the_handshake_and_reaches_nothing(services: Services) -> None:
    """Revocation at the handshake (checked with `ssl` directly): once `provision --revoke` has re-signed the CRL,
    a new connection with the revoked certificate gets no HTTP answer and writes nothing to the audit log; the
    other hospitals' certificates still connect."""
    port = services.aggregator_port
    contexts = {holder: services.tls(holder) for holder in ("hospital-1", "hospital-2")}  # revoking removes its files

    def answered(holder: str) -> bool:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            with contexts[holder].wrap_socket(raw, server_hostname="127.0.0.1") as connection:
                connection.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                return connection.recv(12).startswith(b"HTTP/1.1 ")
        except (ssl.SSLError, OSError):
            return False
        finally:
            raw.close()

    assert answered("hospital-2")
    run_cli("provision", "--revoke", "hospital-2", home=services.home)
    deadline = time.monotonic() + 60  # the aggregator looks at the CRL every second: a safety bound only
    while answered("hospital-2"):
        assert time.monotonic() < deadline, "the revoked certificate still connects"
        time.sleep(0.2)
    audit = services.home / "audit.log"
    before = audit.stat().st_size if audit.exists() else 0
    revoked_before = refused_handshakes(services, "revoked")
    assert not any(answered("hospital-2") for _ in range(20))
    assert (audit.stat().st_size if audit.exists() else 0) == before
    # Counted instead, by reason, on the operations port that Prometheus scrapes.
    assert refused_handshakes(services, "revoked") == revoked_before + 20
    assert answered("hospital-1")


def refused_handshakes(services: Services, reason: str) -> float:
    exposed = httpx.get(f"http://127.0.0.1:{services.aggregator_port + 1}/metrics").text
    found = re.search(rf'health_mlops_tls_handshakes_refused_total{{reason="{reason}"}} (\S+)', exposed)
    return float(found.group(1)) if found else 0.0


# Last in the module: it stops the dashboard the tests above share.
def test_uploads_are_private_and_removed_when_the_dashboard_stops(services: Services) -> None:
    csv = b"heart_rate,spo2\n80,97\n"
    response = httpx.post(f"http://127.0.0.1:{services.dashboard_port}/gradio_api/upload",
                          files={"files": ("patients.csv", csv, "text/csv")}, headers=services.session, timeout=30)
    assert response.status_code == 200, response.text
    scratch = services.home / "scratch" / f"dashboard-{services.pid('dashboard')}"
    stored = Path(response.json()[0])
    assert stored.is_relative_to(scratch) and stored.read_bytes() == csv
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
    dashboard = services.processes.children["dashboard"].process
    dashboard.send_signal(signal.SIGTERM)  # the last test of this module: the dashboard stops
    dashboard.wait(timeout=60)
    assert not scratch.exists()

