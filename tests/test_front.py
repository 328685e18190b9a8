"""The HTTP front (`serving.hosts.serve.front`, aiohttp) with its TorchServe backend (`serving.hosts.torchserve.front`,
aiohttp's client) against a real stdlib HTTP server that echoes what it received, and against a closed port:
content-type rewrite, chunked uploads, limits (413, 431, 400), 502, keep-alive, metrics, readiness, routes. Real
sockets, real `curl`. Both backends behind the same front on a real model: tests/test_api.py."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry

from serving.client import Client
from serving.hosts.serve.front import Front, FrontSettings, outcome_of
from serving.hosts.serve.telemetry import FrontMetrics
from serving.hosts.torchserve.front import TorchServeBackend

CURL = shutil.which("curl")


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with a JSON list describing it (like the service, one item)."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if "slow" in self.path:
            time.sleep(1.5)
        seen = {
            "method": self.command,
            "path": self.path,
            "content_type": self.headers.get("Content-Type"),
            "content_length": self.headers.get("Content-Length"),
            "transfer_encoding": self.headers.get("Transfer-Encoding"),
            "expect": self.headers.get("Expect"),
            "length": len(body),
            "head": body[:8].hex(),
            "connection_id": id(self.connection),
            "authorization": self.headers.get("Authorization"),
        }
        payload = json.dumps([seen] if "error" not in self.path else [{"error": {"code": "x", "message": "y"}}])
        data = payload.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def backend():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def metrics():
    registry = CollectorRegistry()
    return registry, FrontMetrics(registry)


@pytest.fixture(scope="module")
def front(backend, metrics):
    settings = FrontSettings(
        host="127.0.0.1",
        port=free_port(),
        model_name="m",
        max_request_bytes=100_000,
        max_header_bytes=4096,
        read_timeout_s=5,
    )
    with Front(settings, _backend(backend), metrics[1]) as running:
        yield running


def _backend(port: int) -> TorchServeBackend:
    return TorchServeBackend(port, "m", token=lambda: "backend-key")


def _url(front, path="/predictions/m"):
    return f"http://127.0.0.1:{front.settings.port}{path}"


def _curl(*args, stdin=None):
    if CURL is None:
        pytest.skip("curl not installed")
    run = subprocess.run([CURL, "-sS", *args], input=stdin, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr.decode()
    return run.stdout.decode()


def test_plain_curl_data_binary_reaches_the_backend_as_octet_stream(front, tmp_path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\r\n\r\n--x")  # binary, with CR/LF inside
    seen = json.loads(_curl("--data-binary", f"@{image}", _url(front)))[0]
    assert seen["content_type"] == "application/octet-stream"  # curl sent application/x-www-form-urlencoded
    assert seen["length"] == image.stat().st_size and seen["head"] == image.read_bytes()[:8].hex()
    assert seen["method"] == "POST" and seen["expect"] is None


def test_other_content_types_are_left_alone_and_other_paths_never_reach_the_backend(front):
    seen = json.loads(_curl("-H", "Content-Type: image/png", "--data-binary", "abc", _url(front)))[0]
    assert seen["content_type"] == "image/png"
    out = _curl("-w", "\n%{http_code}", "--data-binary", "a=b", _url(front, "/other"))
    body, status = out.rsplit("\n", 1)
    assert status == "404" and json.loads(body)["error"]["code"] == "not_found"  # not forwarded: an allow-list
    out = _curl("-w", "\n%{http_code}", "--data-binary", "a=b", _url(front, "/predictions/another-model"))
    assert out.rsplit("\n", 1)[1] == "404"


def test_chunked_upload_is_dechunked(front, tmp_path):
    data = bytes(range(256)) * 100  # 25.6 kB
    seen = json.loads(_curl("-H", "Transfer-Encoding: chunked", "--data-binary", "@-", _url(front), stdin=data))[0]
    assert seen["length"] == len(data) and seen["transfer_encoding"] is None
    assert seen["content_length"] == str(len(data)) and seen["content_type"] == "application/octet-stream"
    seen = json.loads(_curl("-X", "POST", "-T", "-", _url(front), stdin=data))[0]  # upload from stdin: chunked
    assert seen["length"] == len(data) and seen["method"] == "POST"


def test_oversize_bodies_get_413_and_the_front_keeps_answering(front):
    big = b"x" * 100_001
    out = _curl("-w", "\n%{http_code}", "--data-binary", "@-", _url(front), stdin=big)
    body, status = out.rsplit("\n", 1)
    assert status == "413" and json.loads(body)["error"]["code"] == "too_large"
    out = _curl(
        "-w", "\n%{http_code}", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-", _url(front), stdin=big
    )
    assert out.rsplit("\n", 1)[1] == "413"
    assert json.loads(_curl("--data-binary", "ok", _url(front)))[0]["length"] == 2


def test_large_accepted_body_with_expect_100_continue(front):
    data = b"y" * 99_000
    conn = http.client.HTTPConnection("127.0.0.1", front.settings.port, timeout=10)
    conn.putrequest("POST", "/predictions/m")
    conn.putheader("Content-Length", str(len(data)))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    sock = conn.sock
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(data)
    response = conn.getresponse()
    seen = json.loads(response.read())[0]
    assert response.status == 200 and seen["length"] == len(data) and seen["expect"] is None
    conn.close()


def test_header_limit_and_malformed_requests(front):
    huge = "a" * 5000
    out = _curl("-w", "\n%{http_code}", "-H", f"X-Big: {huge}", "--data-binary", "x", _url(front))
    assert out.rsplit("\n", 1)[1] == "431"
    with socket.create_connection(("127.0.0.1", front.settings.port), timeout=5) as sock:
        sock.sendall(b"POST /predictions/m HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert sock.recv(1000).split(b"\r\n")[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.0 400 Bad Request")
    with socket.create_connection(("127.0.0.1", front.settings.port), timeout=5) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        assert sock.recv(1000).split(b"\r\n")[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.0 400 Bad Request")


def test_keep_alive_several_requests_on_one_connection(front):
    conn = http.client.HTTPConnection("127.0.0.1", front.settings.port, timeout=10)
    ids = set()
    for n in range(5):
        conn.request("POST", "/predictions/m", body=b"z" * (n + 1))
        response = conn.getresponse()
        seen = json.loads(response.read())[0]
        assert response.status == 200 and seen["length"] == n + 1
        assert response.getheader("Connection") != "close"  # HTTP/1.1: keep-alive unless said otherwise
        ids.add(seen["connection_id"])
    local = conn.sock.getsockname()
    conn.request("GET", "/v2/health/live")
    assert conn.getresponse().read() and conn.sock.getsockname() == local  # still the same client connection
    conn.close()
    assert len(ids) <= 2, "the front should reuse its backend connection"


def test_the_backend_gets_its_key_never_the_clients_header(front):
    seen = json.loads(_curl("-H", "Authorization: Bearer client", "--data-binary", "abc", _url(front)))[0]
    assert seen["authorization"] == "Bearer backend-key"


def test_ping_is_503_until_a_prediction_succeeds(backend):
    """Readiness (Kubernetes): a started front whose model has not answered yet is not ready."""
    settings = FrontSettings(host="127.0.0.1", port=free_port(), model_name="m")
    with Front(settings, _backend(backend)) as front:
        for path in ("/ping", "/v2/health/ready", "/v2/models/m/ready"):
            out = _curl("-w", "\n%{http_code}", _url(front, path))
            assert out.rsplit("\n", 1)[1] == "503", path
        assert _curl("-o", "/dev/null", "-w", "%{http_code}", _url(front, "/v2/health/live")) == "200"
        assert _curl("-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "x", _url(front, "/predictions/m?error"))
        assert _curl("-o", "/dev/null", "-w", "%{http_code}", _url(front, "/ping")) == "503"  # an error is not ready
        _curl("--data-binary", "x", _url(front))  # a good answer
        assert _curl("-o", "/dev/null", "-w", "%{http_code}", _url(front, "/ping")) == "200"
        assert _curl("-o", "/dev/null", "-w", "%{http_code}", _url(front, "/v2/health/ready")) == "200"


def test_slow_body_is_408(front):
    with socket.create_connection(("127.0.0.1", front.settings.port), timeout=20) as sock:
        sock.sendall(b"POST /predictions/m HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        assert sock.recv(1000).startswith(b"HTTP/1.1 408 ")  # read_timeout_s = 5


def test_metrics_count_prediction_requests_end_to_end(front, metrics):
    registry, _ = metrics
    before = registry.get_sample_value("deepclust_request_duration_seconds_count") or 0
    ok_before = registry.get_sample_value("deepclust_requests_total", {"outcome": "ok"}) or 0
    _curl("--data-binary", "abc", _url(front))
    _curl("--data-binary", "abc", _url(front, "/predictions/m?error"))
    _curl(_url(front, "/ping"))  # not a prediction: not counted
    assert registry.get_sample_value("deepclust_request_duration_seconds_count") == before + 2
    assert registry.get_sample_value("deepclust_requests_total", {"outcome": "ok"}) == ok_before + 1
    assert registry.get_sample_value("deepclust_requests_total", {"outcome": "error"}) >= 1
    assert registry.get_sample_value("deepclust_request_duration_seconds_sum") > 0


def test_backend_down_is_502_json_and_the_connection_survives():
    registry = CollectorRegistry()
    settings = FrontSettings(host="127.0.0.1", port=free_port(), model_name="m")
    with Front(settings, _backend(free_port()), FrontMetrics(registry)):
        conn = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=10)
        for _ in range(2):
            conn.request("POST", "/predictions/m", body=b"img")
            response = conn.getresponse()
            body = json.loads(response.read())
            assert response.status == 502 and body["error"]["code"] == "backend_unavailable"
        conn.close()
    assert registry.get_sample_value("deepclust_requests_total", {"outcome": "backend_unavailable"}) == 2


def test_a_busy_port_fails_at_start_and_stop_releases_the_port(backend):
    port = free_port()
    settings = FrontSettings(host="127.0.0.1", port=port)
    with Front(settings, _backend(backend)), pytest.raises(OSError):
        Front(settings, _backend(backend)).start()
    with socket.socket() as sock:  # released after stop
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, b'[{"cluster": 1}]', "ok"),
        (200, b'[{"cluster": 1}, {"error": {}}]', "partial"),
        (200, b'[{"error": {}}]', "error"),
        (400, None, "bad_request"),
        (413, None, "too_large"),
        (503, None, "unavailable"),
        (500, None, "server_error"),
    ],
)
def test_outcome_labels(status, body, outcome):
    assert outcome_of(status, body) == outcome


def test_client_starts_a_clean_connection_after_a_timeout(backend):
    """`serving.client.Client` keeps one keep-alive connection: a request that times out half-way must not leave it
    unusable (http.client's `CannotSendRequest` on every later call: what stopped the worker-kill test's clients)."""
    with Client(f"http://127.0.0.1:{backend}", "m", timeout=0.5) as client:
        with pytest.raises(TimeoutError):
            client.post(b"x", "application/octet-stream", path="/predictions/slow")
        status, body = client.post(b"abc", "application/octet-stream")
        assert status == 200 and body[0]["length"] == 3
