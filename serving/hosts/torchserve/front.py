"""The HTTP front of `deepclust serve`: a small asyncio HTTP/1.1 reverse proxy in front of TorchServe.

Why it exists: `curl --data-binary @cat.jpg URL` sends `Content-Type: application/x-www-form-urlencoded`, and
TorchServe 0.12's Netty frontend parses such a body as a form and answers 500 (`ErrorDataDecoderException: Bad end
of line`) before our handler sees the bytes; no TorchServe setting changes that. We never accept forms, so for
prediction uploads (`POST`/`PUT /predictions/...`) the front rewrites a form or missing `Content-Type` to
`application/octet-stream`, and the raw body reaches the handler as one image. Everything else is forwarded as is.

It is also where the *end-to-end* latency is visible (TorchServe's queueing and batching delay included), so it owns
`deepclust_request_duration_seconds` and `deepclust_requests_total{outcome}` (see `telemetry.FrontMetrics`).

Behaviour, in short:
- listens on the configured inference address; TorchServe's inference API sits on an internal loopback port;
- HTTP/1.1 keep-alive towards clients and towards TorchServe (a small pool of idle backend connections),
  `TCP_NODELAY` on both sides (Nagle + delayed ACK cost ≈ 40 ms per request on loopback);
  each message head + body goes out in one write;
- request bodies by `Content-Length` or `Transfer-Encoding: chunked` (de-chunked and forwarded with a length),
  `Expect: 100-continue` answered by the front; both length headers at once, or any other transfer coding: 400;
- limits: body ≤ `max_request_bytes` (413 with a JSON error, then the connection is closed), request head ≤
  `max_header_bytes` (431), time to receive a request head/body (408), idle keep-alive time (silent close), time for
  TorchServe to answer (504);
- TorchServe unreachable or dropping the connection: 502 with a JSON error. A request is retried once on a fresh
  connection only when a *pooled* connection turned out to be closed before any byte of the answer came back.

Stdlib only: the per-request cost is a few tens of microseconds of Python, small next to decode + inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("deepclust.front")

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"expect",
    b"content-length",
}
FORM = b"application/x-www-form-urlencoded"
OCTET_STREAM = b"application/octet-stream"
REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}
STREAM_CHUNK = 1 << 16


@dataclass(frozen=True)
class FrontSettings:
    """Where to listen, where TorchServe is, and the limits (from `ServeConfig`)."""

    host: str
    port: int
    backend_host: str
    backend_port: int
    max_request_bytes: int = 100 * (1 << 20)
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    read_timeout_s: float = 30.0  # to receive one request head, and its body
    keepalive_timeout_s: float = 75.0  # idle time between requests on a client connection
    backend_timeout_s: float = 130.0  # to receive TorchServe's answer
    pool_size: int = 32  # idle backend connections kept
    prediction_prefix: str = "/predictions/"
    # TorchServe always runs with token authorization (it is the only lock on its gRPC management service). When the
    # service itself is open (`token_auth` off), the front authorizes every forwarded request with TorchServe's
    # inference key, read lazily from the key file TorchServe writes at start (None: pass the client's header on).
    backend_token: Callable[[], str | None] | None = None


class HttpError(Exception):
    """An error the front answers itself (JSON body); the client connection is closed afterwards."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BackendError(Exception):
    """TorchServe could not be reached or dropped the connection."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # (lower-case name, value), in order, hop-by-hop removed
    keep_alive: bool
    body: bytes = b""


def error_response(status: int, code: str, message: str, *, keep_alive: bool = False) -> bytes:
    """A complete HTTP/1.1 response with the service's JSON error shape (docs/design.md §3)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _parse_head(head: bytes, max_headers: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split a message head into its first line and (lower-case name, value) pairs; ValueError if malformed."""
    lines = head[:-4].split(b"\r\n")
    if len(lines) - 1 > max_headers:
        raise HttpError(431, "bad_request", f"more than {max_headers} header fields")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


class _ResetTolerantProtocol(asyncio.StreamReaderProtocol):
    """TorchServe closes the connection with a TCP reset after some answers (its 4xx ones carry `connection:
    close`). asyncio would then make every read raise, even of the complete answer already buffered; here a reset
    is an end of stream, so the buffered answer is still read and a truncated one still fails."""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(None)


class _Backend:
    """A pool of keep-alive connections to TorchServe's inference API."""

    def __init__(self, host: str, port: int, pool_size: int) -> None:
        self.host, self.port, self.pool_size = host, port, pool_size
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """(reader, writer, reused): a pooled connection if any is open, else a new one."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16, loop=loop)
        try:
            transport, protocol = await loop.create_connection(
                lambda: _ResetTolerantProtocol(reader, loop=loop), self.host, self.port
            )
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        except OSError as exc:
            raise BackendError(f"TorchServe is not reachable at {self.host}:{self.port}: {exc}") from exc
        _nodelay(writer)
        return reader, writer, False

    def release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reusable: bool) -> None:
        if reusable and len(self.idle) < self.pool_size and not writer.is_closing():
            self.idle.append((reader, writer))
        else:
            writer.close()

    def close(self) -> None:
        for _reader, writer in self.idle:
            writer.close()
        self.idle.clear()


class Front:
    """The proxy; `start()` runs it on its own event-loop thread (the caller's thread stays free), `stop()`."""

    def __init__(self, settings: FrontSettings, metrics=None) -> None:
        self.settings = settings
        self.metrics = metrics  # serving.hosts.torchserve.telemetry.FrontMetrics or None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.server: asyncio.base_events.Server | None = None
        self.backend = _Backend(settings.backend_host, settings.backend_port, settings.pool_size)
        self.clients: set[asyncio.Task] = set()

    # ---------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bind (errors such as a busy port are raised here, in the caller's thread) and serve in a thread."""
        ready: dict[str, object] = {}
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                self.server = loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: BLE001 - handed over to the caller's thread
                ready["error"] = exc
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self.thread = threading.Thread(target=run, name="deepclust-front", daemon=True)
        self.thread.start()
        started.wait()
        if "error" in ready:
            self.thread.join()
            self.thread = None
            raise ready["error"]  # type: ignore[misc]

    async def _listen(self) -> asyncio.base_events.Server:
        return await asyncio.start_server(
            self._client,
            self.settings.host,
            self.settings.port,
            limit=self.settings.max_header_bytes,
            reuse_address=True,
            backlog=512,
        )

    async def _shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.clients):
            task.cancel()
        if self.clients:
            await asyncio.gather(*self.clients, return_exceptions=True)
        self.backend.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def stop(self) -> None:
        """Stop listening, drop client and backend connections, join the thread; idempotent."""
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        self.thread = None

    def __enter__(self) -> Front:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ per client
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.clients.add(task)
        _nodelay(writer)
        try:
            first = True
            while True:
                if not await self._one(reader, writer, first):
                    break
                first = False
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - one bad connection must not take the front down
            log.exception("front: unexpected error on a client connection")
        finally:
            self.clients.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool) -> bool:
        """Serve one request; False when the connection must be closed."""
        s = self.settings
        request: Request | None = None
        started = time.perf_counter()
        try:
            try:
                # The first request must arrive promptly; later ones may wait the keep-alive time.
                async with asyncio.timeout(s.read_timeout_s if first else s.keepalive_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError as exc:
                raise HttpError(431, "bad_request", f"request head larger than {s.max_header_bytes} bytes") from exc
            except asyncio.IncompleteReadError:
                return False  # the client closed the connection (normally between requests)
            except TimeoutError as exc:
                if not first:
                    return False  # idle keep-alive connection: close silently
                raise HttpError(408, "bad_request", "request head not received in time") from exc
            started = time.perf_counter()
            request = self._parse_request(head)
            await self._read_body(request, reader, writer)
            keep_alive = await self._forward(request, writer)
        except HttpError as exc:
            writer.write(error_response(exc.status, exc.code, exc.message))
            self._observe(request, exc.status, None, started, fallback=exc.code)
            await _lingering_close(reader, writer)
            return False
        except BackendError as exc:
            keep = request.keep_alive if request else False
            writer.write(error_response(502, "backend_unavailable", str(exc), keep_alive=keep))
            await writer.drain()
            self._observe(request, 502, None, started)
            return keep
        return keep_alive

    # ------------------------------------------------------------------------------------------- request
    def _parse_request(self, head: bytes) -> Request:
        try:
            line, headers = _parse_head(head, self.settings.max_headers)
            method, target, version = line.split(b" ")
        except ValueError as exc:
            raise HttpError(400, "bad_request", f"malformed HTTP request: {exc}") from exc
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise HttpError(400, "bad_request", f"unsupported protocol {version[:20]!r}")
        tokens = _connection_tokens(headers)
        keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
        return Request(method, target, version, headers, keep_alive)

    async def _read_body(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        lengths = {v for n, v in request.headers if n == b"content-length"}
        codings = [v.lower() for n, v in request.headers if n == b"transfer-encoding"]
        if codings and lengths:
            raise HttpError(400, "bad_request", "both Content-Length and Transfer-Encoding are set")
        if codings and codings != [b"chunked"]:
            raise HttpError(501, "bad_request", f"unsupported Transfer-Encoding {b', '.join(codings)[:50]!r}")
        length = 0
        if lengths:
            if len(lengths) > 1 or not next(iter(lengths)).isdigit():
                raise HttpError(400, "bad_request", "invalid Content-Length")
            length = int(next(iter(lengths)))
            if length > s.max_request_bytes:
                raise HttpError(
                    413, "too_large", f"request body of {length} bytes exceeds the limit of {s.max_request_bytes}"
                )
        expects = [v.lower() for n, v in request.headers if n == b"expect"]
        if expects and (codings or length):
            if expects != [b"100-continue"]:
                raise HttpError(400, "bad_request", "unsupported Expect header")
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        try:
            async with asyncio.timeout(s.read_timeout_s):
                if codings:
                    request.body = await self._read_chunked(reader)
                elif length:
                    request.body = await reader.readexactly(length)
        except TimeoutError as exc:
            raise HttpError(408, "bad_request", "request body not received in time") from exc
        request.headers = [(n, v) for n, v in request.headers if n not in HOP_BY_HOP]
        if s.backend_token is not None:
            token = s.backend_token()
            request.headers = [(n, v) for n, v in request.headers if n != b"authorization"]
            if token:
                request.headers.append((b"authorization", b"Bearer " + token.encode()))
        if request.method in (b"POST", b"PUT") and request.target.startswith(s.prediction_prefix.encode()):
            _raw_upload_content_type(request)

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        limit = self.settings.max_request_bytes
        parts, total = [], 0
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise HttpError(400, "bad_request", "malformed chunk size") from exc
            if size == 0:
                while (await reader.readline()).strip():  # trailers (ignored)
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise HttpError(413, "too_large", f"chunked request body exceeds the limit of {limit} bytes")
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise HttpError(400, "bad_request", "malformed chunk")

    # ------------------------------------------------------------------------------------------- forward
    async def _forward(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        """Send to TorchServe, relay the answer; returns whether the client connection stays open."""
        started = time.perf_counter()
        head = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            head += [name, b": ", value, b"\r\n"]
        if request.body or request.method in (b"POST", b"PUT", b"PATCH"):
            head.append(b"content-length: %d\r\n" % len(request.body))
        head.append(b"\r\n")
        message = b"".join(head) + request.body
        for attempt in range(2):
            reader, backend_writer, reused = await self.backend.acquire()
            try:
                backend_writer.write(message)
                await backend_writer.drain()
                async with asyncio.timeout(self.settings.backend_timeout_s):  # a timer, not a task per read
                    status_line = await reader.readuntil(b"\r\n\r\n")
                break
            except TimeoutError as exc:
                backend_writer.close()
                raise HttpError(504, "timeout", "TorchServe did not answer in time") from exc
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
                backend_writer.close()
                if reused and attempt == 0:
                    self.backend.close()  # its siblings are probably stale too (TorchServe restarted)
                    continue  # a stale pooled connection: retry once on a fresh one
                raise BackendError(f"TorchServe dropped the connection: {exc!r}") from exc
        first, headers = _parse_head(status_line, 1000)
        try:
            status = int(first.split(b" ", 2)[1])
        except (IndexError, ValueError) as exc:
            backend_writer.close()
            raise BackendError(f"malformed answer from TorchServe: {first[:80]!r}") from exc
        backend_keep = b"close" not in _connection_tokens(headers)
        length = next((v for n, v in headers if n == b"content-length"), None)
        chunked = any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers)
        no_body = request.method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        keep = request.keep_alive
        out = [first, b"\r\n"]
        for name, value in headers:
            if name not in (b"connection", b"keep-alive", b"transfer-encoding"):
                out += [name, b": ", value, b"\r\n"]
        if chunked and not no_body and request.version == b"HTTP/1.1":
            out.append(b"transfer-encoding: chunked\r\n")
        elif chunked and not no_body:
            keep = False  # HTTP/1.0 client: de-chunk, end the body by closing
        elif length is None and not no_body:
            keep, backend_keep = False, False  # body ends when TorchServe closes
        out.append(b"connection: keep-alive\r\n\r\n" if keep else b"connection: close\r\n\r\n")
        response_head = b"".join(out)
        body_for_metrics = None
        try:
            if no_body:
                writer.write(response_head)
            elif length is not None:
                n = int(length)
                if n <= 1 << 20:
                    async with asyncio.timeout(self.settings.backend_timeout_s):
                        body_for_metrics = await reader.readexactly(n)
                    if status in (400, 500):
                        status, response_head, body_for_metrics = _rewrite_backend_error(
                            status, response_head, body_for_metrics, keep
                        )
                    writer.write(response_head + body_for_metrics)
                else:
                    writer.write(response_head)
                    await _relay(reader, writer, n, self.settings.backend_timeout_s)
            elif chunked:
                writer.write(response_head)
                await _relay_chunked(reader, writer, raw=request.version == b"HTTP/1.1")
            else:
                writer.write(response_head)
                while chunk := await reader.read(STREAM_CHUNK):
                    writer.write(chunk)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            backend_writer.close()
            writer.close()
            self._observe(request, 502, None, started)
            return False
        self.backend.release(reader, backend_writer, backend_keep)
        await writer.drain()
        self._observe(request, status, body_for_metrics, started)
        return keep

    # ------------------------------------------------------------------------------------------- metrics
    def _observe(
        self, request: Request | None, status: int, body: bytes | None, started: float, fallback: str = ""
    ) -> None:
        if self.metrics is None or request is None:
            return
        if not request.target.startswith(self.settings.prediction_prefix.encode()):
            return
        self.metrics.observe(time.perf_counter() - started, outcome_of(status, body, fallback))


def outcome_of(status: int, body: bytes | None, fallback: str = "") -> str:
    """The low-cardinality outcome label of a prediction request, from its status and (for 200) its JSON list."""
    if status == 200:
        try:
            items = json.loads(body) if body is not None else None
        except ValueError:
            items = None
        if not isinstance(items, list) or not items:
            return "ok"
        errors = sum(1 for item in items if isinstance(item, dict) and "error" in item)
        return "ok" if errors == 0 else ("error" if errors == len(items) else "partial")
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "unauthorized",
        404: "not_found",
        408: "timeout",
        413: "too_large",
        431: "bad_request",
        502: "backend_unavailable",
        503: "unavailable",
        504: "timeout",
    }.get(status, fallback if fallback in {"bad_request", "too_large", "timeout"} else "server_error")


def _rewrite_backend_error(status: int, head: bytes, body: bytes, keep_alive: bool) -> tuple[int, bytes, bytes]:
    """Two TorchServe answers that blame the wrong party, turned into the service's JSON errors:
    - 400 `InvalidKeyException` (token authorization on, key missing or wrong) → 401 + `WWW-Authenticate: Bearer`,
      `{"error": {"code": "unauthorized", …}}` (the front's own error shape, as for 413/502);
    - 500 `ErrorDataDecoderException` (Netty's multipart decoder failed on a malformed client body, e.g. a part
      without a `name`) → 400 + a one-item JSON error list, as the handler answers an unusable request.
    Any other answer is relayed unchanged."""
    if status == 400 and b'"InvalidKeyException"' in body:
        new_body = json.dumps(
            {"error": {"code": "unauthorized", "message": "missing or wrong token, send 'Authorization: Bearer <key>'"}}
        ).encode()
        status, reason, extra = 401, "Unauthorized", 'www-authenticate: Bearer realm="deepclust"\r\n'
    elif status == 500 and b'"ErrorDataDecoderException"' in body:
        try:
            detail = str(json.loads(body).get("message", ""))[:200]
        except (ValueError, AttributeError):
            detail = ""
        message = "malformed multipart/form-data body" + (f" ({detail})" if detail else "")
        new_body = json.dumps([{"error": {"code": "bad_request", "message": message}}]).encode()
        status, reason, extra = 400, "Bad Request", ""
    else:
        return status, head, body
    new_head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(new_body)}\r\nconnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return status, new_head.encode(), new_body


def _raw_upload_content_type(request: Request) -> None:
    """A form-encoded or untyped prediction upload is a raw image (we never accept forms): say so to TorchServe,
    whose form decoder would otherwise fail on the binary body with a 500."""
    for i, (name, value) in enumerate(request.headers):
        if name == b"content-type":
            if value.split(b";", 1)[0].strip().lower() == FORM:
                request.headers[i] = (name, OCTET_STREAM)
            return
    if request.body:
        request.headers.append((b"content-type", OCTET_STREAM))


async def _lingering_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float = 2.0) -> None:
    """Send what is buffered, half-close, and discard what the client still sends (the rest of a refused body) for
    a moment: closing with unread input would reset the connection and could destroy our answer before the client
    reads it (the lingering close of nginx and Apache)."""
    with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(seconds):
            while await reader.read(STREAM_CHUNK):
                pass


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, timeout: float) -> None:
    while n > 0:
        async with asyncio.timeout(timeout):
            chunk = await reader.read(min(n, STREAM_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", n)
        writer.write(chunk)
        await writer.drain()
        n -= len(chunk)


async def _relay_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bool) -> None:
    while True:
        line = await reader.readline()
        size = int(line.split(b";", 1)[0].strip(), 16)
        data = await reader.readexactly(size + 2)
        if raw:
            writer.write(line + data)
        elif size:
            writer.write(data[:-2])
        await writer.drain()
        if size == 0:
            return


def settings_from(config, backend_port: int, backend_token: Callable[[], str | None] | None = None) -> FrontSettings:
    """FrontSettings from a `serving.hosts.torchserve.server.ServeConfig`; `backend_token` only when the service
    itself is open (token authorization off), so that clients never need TorchServe's key."""
    return FrontSettings(
        host=config.host,
        port=config.port,
        backend_host="127.0.0.1",
        backend_port=backend_port,
        max_request_bytes=config.max_request_bytes,
        max_header_bytes=config.max_header_bytes,
        read_timeout_s=config.read_timeout_s,
        keepalive_timeout_s=config.keepalive_timeout_s,
        backend_timeout_s=config.response_timeout_s + 10,
        backend_token=None if config.auth_enabled else backend_token,
    )
