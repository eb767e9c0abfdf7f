"""A man in the middle between a hospital's node and the aggregator, for tests of what a node sends and of what
it does when the aggregator lies.

It holds the consortium's keys (the test issued them): it terminates the node's mutual TLS with the aggregator's
certificate, dials the aggregator with the node's certificate, keeps the plaintext of everything the node sends,
may hold a request back (`hold`), and may rewrite what the aggregator answers (`rewrite`: a response body in, the
body the node gets out) as a dishonest aggregator would.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from health_mlops.trust.pki import CA, SERVER, cert_path, key_path
from health_mlops.trust.tls import client_context, server_context


@dataclass(frozen=True)
class Request:
    at: float  # when its first byte reached the recorder
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def signature(self) -> tuple[str, str, tuple[str, ...], int]:
        return self.method, self.path, tuple(sorted(self.headers)), len(self.body)


class RecordingProxy:
    """The man in the middle: one asyncio loop in a thread, a TLS listener, a TLS dial per connection."""

    def __init__(self, credentials: Path, hospital: str, port: int, upstream_port: int) -> None:
        self.port, self.upstream_port = port, upstream_port
        self.rewrite: Callable[[bytes], bytes] | None = None  # read at each response: a test may set it any time
        self._holds: list[tuple[bytes, threading.Event]] = []
        self._listen = server_context(cert_path(credentials, SERVER), key_path(credentials, SERVER),
                                      client_ca=cert_path(credentials, CA))
        self._dial = client_context(cert_path(credentials, hospital), key_path(credentials, hospital),
                                    cert_path(credentials, CA))
        self.connections: list[list[tuple[float, bytes]]] = []  # per connection: (arrival, chunk) sent by the node
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="recording-proxy", daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        assert self._ready.wait(10), "the recording proxy did not start"
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=self._listen))
        self._ready.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        self._server.close()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        recorded: list[tuple[float, bytes]] = []
        self.connections.append(recorded)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port, ssl=self._dial,
                                                                 server_hostname="127.0.0.1")
            await asyncio.gather(self._pipe(reader, up_writer, recorded), self._answer(up_reader, writer))
        except asyncio.CancelledError:  # the proxy is shutting down (asyncio would log a cancelled connection)
            writer.close()

    async def _answer(self, source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        """Pass the aggregator's responses on, each rewritten if `rewrite` is set (every response has a
        Content-Length, or no body: the aggregator never sends chunked)."""
        try:
            while True:
                head = await source.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(line.split(":", 1)[1]) for line in lines
                               if line.lower().startswith("content-length:")), 0)
                body = await source.readexactly(length)
                rewrite = self.rewrite
                if rewrite is not None and body:
                    body = rewrite(body)
                    head = "\r\n".join(f"content-length: {len(body)}" if line.lower().startswith("content-length:")
                                        else line for line in lines).encode("latin-1")
                target.write(head + body)
                await target.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            target.close()

    def hold(self, marker: bytes) -> threading.Event:
        """From now on, hold back what the node sends in a chunk containing `marker` (a request's path: small
        requests come in one chunk) until the event returned is set."""
        released = threading.Event()
        self._holds.append((marker, released))
        return released

    async def _pipe(self, source: asyncio.StreamReader, target: asyncio.StreamWriter,
                    recorded: list[tuple[float, bytes]]) -> None:
        try:
            while chunk := await source.read(65536):
                recorded.append((time.time(), chunk))
                for marker, released in self._holds:
                    if marker in chunk and not released.is_set():
                        await asyncio.get_running_loop().run_in_executor(None, released.wait)
                target.write(chunk)
                await target.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            target.close()

    def requests(self) -> list[Request]:
        """Every request recorded so far, parsed from each connection's plaintext."""
        found = []
        for chunks in list(self.connections):
            found += _parse_requests(list(chunks))
        return sorted(found, key=lambda r: r.at)


def _parse_requests(chunks: list[tuple[float, bytes]]) -> list[Request]:
    """HTTP/1.1 requests (httpx sends bodies with Content-Length, never chunked), each with its arrival time."""
    starts, size = [], 0
    for at, chunk in chunks:
        starts.append((size, at))
        size += len(chunk)
    stream = b"".join(chunk for _, chunk in chunks)
    requests, offset = [], 0
    while (end := stream.find(b"\r\n\r\n", offset)) != -1:
        head = stream[offset:end].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ")
        headers = {name.strip().lower(): value.strip() for name, value in (h.split(":", 1) for h in head[1:])}
        length = int(headers.get("content-length", "0"))
        if end + 4 + length > len(stream):
            break  # its body is still on the way
        at = max(t for start, t in starts if start <= offset)
        requests.append(Request(at, method, path, headers, stream[end + 4:end + 4 + length]))
        offset = end + 4 + length
    return requests
