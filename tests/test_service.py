"""The real service: TorchServe started on free loopback ports (one start for the module), real HTTP requests,
a real Prometheus scraping our metrics, `promtool check metrics`, and the security defaults."""

import base64
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import requests
from conftest import cifar_jpegs, free_port, predictions_url, running_service

from serving.client import Client, multipart
from serving.hosts.torchserve.server import ServeConfig, TorchServeHost, render_properties

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(request, tiny_model_dir):
    """The default model when it has been exported (the real thing), else the tiny contract model."""
    from conftest import REPO_ROOT

    default = REPO_ROOT / "model_store" / "cifar10-lite0"
    return default if (default / "model.onnx").is_file() else tiny_model_dir


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    with running_service(
        tmp_path_factory,
        model=str(model_dir),
        batch_size=8,
        max_batch_delay_ms=50,
        max_request_bytes=1 << 20,
    ) as host:
        yield host


@pytest.fixture(scope="module")
def url(service):
    return predictions_url(service)


@pytest.fixture(scope="module")
def images(cifar_test_dir):
    """Two real JPEGs per class (20 images)."""
    return cifar_jpegs(cifar_test_dir, 2)


def _check_assignment(item, k):
    assert set(item) == {"cluster", "confidence", "label"}
    assert 0 <= item["cluster"] < k and 0.0 < item["confidence"] <= 1.0


def test_single_raw_image_answers_a_one_item_list(service, url, images):
    response = requests.post(url, data=images[0], timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list) and len(body) == 1
    _check_assignment(body[0], service_k(service))


def service_k(service):
    from serving.core.contract import ModelCard

    return ModelCard.load(service.config.model_dir).k


def test_multipart_keeps_order_and_matches_single(service, url, images):
    body, content_type = multipart(images[:5])
    response = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 200
    many = response.json()
    assert len(many) == 5
    singles = [requests.post(url, data=img, timeout=30).json()[0] for img in images[:5]]
    assert [m["cluster"] for m in many] == [s["cluster"] for s in singles]
    for m, s in zip(many, singles):
        assert m["confidence"] == pytest.approx(s["confidence"], rel=1e-4)


def test_json_base64_with_a_broken_item(service, url, images):
    payload = {
        "images": [
            base64.b64encode(images[0]).decode(),
            "%%%not-base64",
            base64.b64encode(b"junk").decode(),
            base64.b64encode(images[1]).decode(),
        ]
    }
    response = requests.post(url, json=payload, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert len(body) == 4
    _check_assignment(body[0], service_k(service))
    assert body[1]["error"]["code"] == "bad_request"
    assert body[2]["error"]["code"] == "unsupported_format"
    _check_assignment(body[3], service_k(service))


def test_mixed_multipart_batch_with_broken_images(service, url, images):
    truncated = images[2][: len(images[2]) // 2]
    body, content_type = multipart([images[0], truncated, b"", images[3]])
    result = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=30).json()
    assert [("error" in r) for r in result] == [False, True, True, False]
    assert result[1]["error"]["code"] == "decode_error"
    assert result[2]["error"]["code"] == "empty"


def test_bad_request_is_400_and_the_server_survives(service, url, images):
    response = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert response.json()[0]["error"]["code"] == "bad_request"
    response = requests.post(url, json={"images": "nope"}, timeout=30)
    assert response.status_code == 400
    assert requests.post(url, data=images[0], timeout=30).status_code == 200


def test_top_k_on_request(service, url, images):
    result = requests.post(url, json={"images": [base64.b64encode(images[0]).decode()], "top_k": 3}, timeout=30)
    item = result.json()[0]
    assert len(item["top_k"]) == 3 and item["top_k"][0]["cluster"] == item["cluster"]


def test_concurrency_batches_server_side_and_isolates_bad_requests(service, url, images):
    """32 concurrent clients, every 4th sends garbage: each gets its own answer; batches > 1 are observed."""
    before = _batch_histogram(service)

    def one(i):
        data = b"garbage" if i % 4 == 3 else images[i % len(images)]
        with Client(service.config.base_url, service.config.model_name) as client:
            status, body = client.post(data, "application/octet-stream")
        return i, status, body

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(64)))
    for i, status, body in results:
        assert status == 200 and len(body) == 1
        assert ("error" in body[0]) == (i % 4 == 3)
    after = _batch_histogram(service)
    batches = after["count"] - before["count"]
    images_in = after["sum"] - before["sum"]
    assert batches >= 1 and images_in == pytest.approx(48)  # 48 good images went to the engine
    assert batches < 48, "no server-side batching observed (every request ran alone)"


def _batch_histogram(service):
    text = requests.get(f"http://127.0.0.1:{service.config.metrics_port}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("deepclust_batch_size_count"):
            values["count"] = float(line.split()[-1])
        if line.startswith("deepclust_batch_size_sum"):
            values["sum"] = float(line.split()[-1])
    return values


def test_metrics_names_and_promtool(service, url, images):
    requests.post(url, data=images[0], timeout=30)
    text = requests.get(f"http://127.0.0.1:{service.config.metrics_port}/metrics", timeout=10).text
    for name in [
        "deepclust_requests_total",
        "deepclust_images_total",
        "deepclust_request_duration_seconds_bucket",
        "deepclust_inference_duration_seconds_bucket",
        "deepclust_batch_size_bucket",
        "deepclust_cluster_assignments_total",
        "deepclust_confidence_bucket",
        "deepclust_model_info",
    ]:
        assert name in text, name
    assert 'deepclust_images_total{outcome="ok"}' in text
    assert f'model="{service.config.model_name}"' in text
    info = next(line for line in text.splitlines() if line.startswith("deepclust_model_info{"))
    assert 'provider="cpu"' in info, info  # the provider actually running (no GPU on this machine)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make system-deps)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr


def test_real_prometheus_scrapes_the_service(service, url, images, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (make system-deps)")
    requests.post(url, data=images[0], timeout=30)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: deepclust\n    static_configs: [{{targets: ['127.0.0.1:{service.config.metrics_port}']}}]\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = f"http://127.0.0.1:{port}/api/v1/query"
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            try:
                reply = requests.get(query, params={"query": 'deepclust_images_total{outcome="ok"}'}, timeout=5)
                result = reply.json()["data"]["result"]
                if result:
                    break
            except (requests.ConnectionError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        assert result, "Prometheus never scraped deepclust_images_total"
        assert float(result[0]["value"][1]) >= 1
        targets = requests.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()
        assert targets["data"]["activeTargets"][0]["health"] == "up"
        hist = requests.get(query, params={"query": "deepclust_inference_duration_seconds_count"}, timeout=5).json()
        assert hist["data"]["result"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _reachable(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_management_api_is_off_and_defaults_are_loopback(service):
    config = service.config
    assert not _reachable(config.management_port)  # nothing listens where a management API could be
    properties = (service.state / "config.properties").read_text()
    assert "management_address=unix:" in properties
    assert "enable_model_api=false" in properties and "install_py_dep_per_model=false" in properties
    # TorchServe's inference API is internal (loopback, its own port); clients talk to the front on config.port
    assert f"inference_address=http://127.0.0.1:{service.backend_port}" in properties
    assert service.backend_port != config.port
    # auto: every API on loopback, so clients need no token; TorchServe checks its keys anyway (gRPC management)
    assert not config.auth_enabled and "disable_token_authorization=false" in properties
    # the management endpoints are not served on the inference port either
    assert requests.get(f"{config.base_url}/models", timeout=10).status_code in (400, 404, 405)
    # TorchServe's own metrics API on its own loopback port
    assert (
        "ts_inference_requests_total"
        in urllib.request.urlopen(f"http://127.0.0.1:{config.torchserve_metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )


# --- the HTTP front (serving.hosts.torchserve.front) in front of the real TorchServe ----------------------------
CURL = shutil.which("curl")


def _curl(*args, stdin=None):
    if CURL is None:
        pytest.skip("curl not installed")
    run = subprocess.run([CURL, "-sS", *args], input=stdin, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    return run.stdout.decode()


def _cat_jpg(cifar_test_dir, tmp_path):
    cat = tmp_path / "cat.jpg"
    cat.write_bytes(sorted((cifar_test_dir / "cat").glob("*.jpg"))[0].read_bytes())
    return cat


def test_plain_curl_data_binary_returns_a_cluster_id(service, url, cifar_test_dir, tmp_path):
    """The issue's acceptance command, verbatim: curl sends application/x-www-form-urlencoded."""
    cat = _cat_jpg(cifar_test_dir, tmp_path)
    body = json.loads(_curl("--data-binary", f"@{cat}", url))
    assert isinstance(body, list) and len(body) == 1
    _check_assignment(body[0], service_k(service))
    # TorchServe alone (its internal port) answers the same command with a 500: the front is what makes it work
    direct = f"http://127.0.0.1:{service.backend_port}/predictions/{service.config.model_name}"
    auth = f"Authorization: Bearer {service.inference_token()}"  # TorchServe always checks its key
    assert _curl("-o", "/dev/null", "-w", "%{http_code}", "-H", auth, "--data-binary", f"@{cat}", direct) == "500"


def test_chunked_upload_from_stdin(service, url, cifar_test_dir, tmp_path):
    cat = _cat_jpg(cifar_test_dir, tmp_path)
    single = json.loads(_curl("--data-binary", f"@{cat}", url))[0]
    chunked = json.loads(_curl("-H", "Transfer-Encoding: chunked", "--data-binary", "@-", url, stdin=cat.read_bytes()))
    assert chunked[0]["cluster"] == single["cluster"]
    piped = json.loads(_curl("-X", "POST", "-T", "-", url, stdin=cat.read_bytes()))
    assert piped[0]["cluster"] == single["cluster"]


def test_oversize_body_is_413_and_the_service_keeps_answering(service, url, images):
    too_big = b"\xff\xd8" + b"\0" * (service.config.max_request_bytes + 1)
    response = requests.post(url, data=too_big, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert requests.post(url, data=images[0], timeout=30).status_code == 200


def test_keep_alive_several_requests_on_one_connection(service, url, images):
    with requests.Session() as session:
        answers = [session.post(url, data=img, timeout=30) for img in images[:4]]
        assert all(a.status_code == 200 and "cluster" in a.json()[0] for a in answers)
        assert all(a.headers.get("Connection") == "keep-alive" for a in answers)
        ping = session.get(f"{service.config.base_url}/ping", timeout=10)
        assert ping.json()["status"] == "Healthy"
    with Client(service.config.base_url, service.config.model_name) as client:
        for img in images[:3]:
            assert client.post(img, "image/jpeg")[0] == 200
        local = client._conn.sock.getsockname()
        assert client.post(images[3], "image/jpeg")[0] == 200 and client._conn.sock.getsockname() == local


def _sample(text, name, labels=""):
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def test_end_to_end_latency_histogram_counts_every_prediction_request(service, url, images):
    metrics_url = f"http://127.0.0.1:{service.config.metrics_port}/metrics"
    before = requests.get(metrics_url, timeout=10).text
    for img in images[:3]:
        assert requests.post(url, data=img, timeout=30).status_code == 200
    assert requests.post(url, data=b"{", headers={"Content-Type": "application/json"}, timeout=30).status_code == 400
    requests.get(f"{service.config.base_url}/ping", timeout=10)  # not a prediction: not counted
    after = requests.get(metrics_url, timeout=10).text
    count = "deepclust_request_duration_seconds_count"
    assert _sample(after, count) - _sample(before, count) == 4
    ok = ("deepclust_requests_total", '{outcome="ok"}')
    bad = ("deepclust_requests_total", '{outcome="bad_request"}')
    assert _sample(after, *ok) - _sample(before, *ok) == 3
    assert _sample(after, *bad) - _sample(before, *bad) == 1
    # end to end >= the handler's inference time for the same requests
    seconds = "deepclust_request_duration_seconds_sum"
    assert _sample(after, seconds) > _sample(before, seconds)
    assert after.count("# TYPE deepclust_request_duration_seconds histogram") == 1


def test_token_auth_auto_turns_on_off_loopback(tmp_path, tiny_model_dir):
    exposed = ServeConfig(model=str(tiny_model_dir), host="0.0.0.0", cache_dir=tmp_path)
    assert exposed.auth_enabled
    assert "disable_token_authorization=false" in render_properties(exposed, tmp_path, tmp_path)
    assert not ServeConfig(model=str(tiny_model_dir), cache_dir=tmp_path).auth_enabled
    assert ServeConfig(model=str(tiny_model_dir), token_auth="on", cache_dir=tmp_path).auth_enabled
    loopback = ServeConfig(model=str(tiny_model_dir), management="loopback", cache_dir=tmp_path)
    assert "management_address=http://127.0.0.1:8081" in render_properties(loopback, tmp_path, tmp_path)
    with pytest.raises(ValueError):
        ServeConfig(port=9000, metrics_port=9000)


def test_tampered_model_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "tampered"
    shutil.copytree(tiny_model_dir, folder)
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    host = TorchServeHost(ServeConfig(model=str(folder), cache_dir=tmp_path / "cache"))
    with pytest.raises(ValueError, match="does not match the model card"):
        host.prepare()


def test_predict_cli_against_the_service(service, images, tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(images[0])
    bad.write_bytes(b"nope")
    # The interpreter running the tests, wherever its environment lives (not a hard-coded .venv).
    args = [
        sys.executable,
        "-m",
        "deepclust.cli",
        "predict",
        str(good),
        str(bad),
        "--url",
        service.config.base_url,
        "--model",
        service.config.model_name,
    ]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr  # finished with one item error
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert "cluster" in lines[0] and lines[1]["error"]["code"] == "unsupported_format"
    run = subprocess.run(args[:5] + args[6:], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0


def test_require_gpu_refuses_to_start_on_this_cpu_machine(tiny_model_dir, tmp_path):
    """`require_gpu: true` from a settings file, through the real CLI: no GPU here, so `deepclust serve` exits
    non-zero before starting TorchServe, naming onnxruntime's reason; nothing listens on the port."""
    port = free_port()
    settings = tmp_path / "serve.yaml"
    settings.write_text(f"serve:\n  require_gpu: true\n  model: {tiny_model_dir}\n  port: {port}\n")
    env = {**os.environ, "DEEPCLUST_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "deepclust.cli", "serve", "-c", str(settings)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "require_gpu" in output and "CUDAExecutionProvider" in output, output
    assert not _reachable(port)
    assert not (tmp_path / "cache" / "mar").exists(), "the archive was built: the refusal came too late"
