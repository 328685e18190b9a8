"""`deepclust serve` settings and start-up refusals, without a long-running server: token authorization `auto`, the
backend setting, a tampered model refused by both backends, `require_gpu` refusing to start on this CPU machine.

The running service (both backends, the same requests) is tested in tests/test_api.py; the front alone in
tests/test_front.py; TorchServe's security settings on a running TorchServe in tests/test_security.py."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import free_port

from serving.hosts.serve.config import ServeConfig
from serving.hosts.torchserve.server import TorchServeHost, render_properties


def _reachable(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


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


@pytest.mark.parametrize("backend", ["torchserve", "engine"])
def test_tampered_model_is_refused(tmp_path, tiny_model_dir, backend):
    from serving.hosts.engine_backend.host import EngineHost

    folder = tmp_path / "tampered"
    shutil.copytree(tiny_model_dir, folder)
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    config = ServeConfig(backend=backend, model=str(folder), cache_dir=tmp_path / "cache")
    host = EngineHost(config) if backend == "engine" else TorchServeHost(config)
    with pytest.raises(ValueError, match="does not match the model card"):
        host.prepare()


@pytest.mark.parametrize("backend", ["torchserve", "engine"])
def test_require_gpu_refuses_to_start_on_this_cpu_machine(tiny_model_dir, tmp_path, backend):
    """`require_gpu: true` from a settings file, through the real CLI: no GPU here, so `deepclust serve` exits
    non-zero before starting TorchServe, naming onnxruntime's reason; nothing listens on the port."""
    port = free_port()
    settings = tmp_path / "serve.yaml"
    settings.write_text(
        f"serve:\n  backend: {backend}\n  require_gpu: true\n  model: {tiny_model_dir}\n  port: {port}\n"
    )
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
    assert not (tmp_path / "cache" / "serve").exists(), "a backend was set up: the refusal came too late"


def test_backend_setting(tmp_path, tiny_model_dir):
    assert ServeConfig(model=str(tiny_model_dir), cache_dir=tmp_path).backend == "torchserve"  # the default
    engine = ServeConfig(backend="engine", model=str(tiny_model_dir), port=9000, torchserve_metrics_port=9000)
    assert engine.backend == "engine"  # TorchServe's metrics port is not used: it may equal another
    with pytest.raises(ValueError):
        ServeConfig(backend="triton")
    with pytest.raises(ValueError):
        ServeConfig(port=9000, torchserve_metrics_port=9000)
