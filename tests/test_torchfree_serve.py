"""What the container runs: `deepclust serve` and its TorchServe worker in a Python environment WITHOUT torch (the
serve extra installs none), serving the INT8 variant of the default model (`--variant int8`).

The environment is a real venv whose site-packages are this one's minus torch and everything that needs it (links
to the same installed files), so `import torch` fails there exactly as in the image, and the worker has to run on the
TorchServe stand-in (`serving/hosts/torchserve/ts_shim`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import pytest
import requests
from conftest import REPO_ROOT, cifar_jpegs, free_port

from serving.core.contract import ModelCard
from serving.core.engine import Engine
from serving.core.preprocess import load_image

pytestmark = pytest.mark.slow

TORCH_FAMILY = ("torch", "functorch", "torchgen", "torchvision", "nvidia", "triton", "timm", "efficientnet")
KEEP = ("torchserve", "torch_model_archiver")


@pytest.fixture(scope="module")
def torchless_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torchless")
    env_dir, mirror = root / "venv", root / "site"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    mirror.mkdir()
    source = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    for entry in source.iterdir():
        name = entry.name.lower()
        if name.startswith(TORCH_FAMILY) and not name.startswith(KEEP):
            continue
        (mirror / entry.name).symlink_to(entry)
    target = next((env_dir / "lib").glob("python3*/site-packages"))
    (target / "mirror.pth").write_text(f"import site; site.addsitedir({str(mirror)!r})\n")
    python = env_dir / "bin" / "python"
    # The serve extra's console script, as pip would write it into this environment.
    archiver = env_dir / "bin" / "torch-model-archiver"
    archiver.write_text(
        f"#!{python}\nimport sys\nfrom model_archiver.model_packaging import generate_model_archive\n"
        "sys.exit(generate_model_archive())\n"
    )
    archiver.chmod(0o755)
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=_env())
    assert check.returncode != 0 and "No module named 'torch'" in check.stderr, "torch still importable"
    ok = subprocess.run([python, "-c", "import onnxruntime, ts, serving.hosts.torchserve.server"], env=_env())
    assert ok.returncode == 0
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def test_torch_free_worker_serves_the_int8_variant(torchless_python, default_model_dir, cifar_test_dir, tmp_path):
    port, metrics_port = free_port(), free_port()
    cmd = [str(torchless_python), "-m", "deepclust.cli", "serve", "--model", str(default_model_dir)]
    cmd += ["--variant", "int8", "--port", str(port), "--metrics-port", str(metrics_port), "--threads", "1"]
    # A short cache path: the worker's unix socket lives in the state directory (AF_UNIX paths are <= 107 bytes).
    cache = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))  # noqa: S108
    env = {**_env(), "DEEPCLUST_CACHE": str(cache)}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while b"ready: POST images" not in log.read_bytes():
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        images = cifar_jpegs(cifar_test_dir, 1)
        engine = Engine(default_model_dir / "model.int8.onnx", intra_op_threads=1, warmup=False)
        url = f"http://127.0.0.1:{port}/predictions/{default_model_dir.name}"
        for data in images:
            answer = requests.post(url, data=data, timeout=60).json()[0]
            expected = engine.predict(load_image(data, engine.input_size)[None])[0]
            assert answer["cluster"] == expected.cluster and abs(answer["confidence"] - expected.confidence) < 1e-4
        card = ModelCard.load(default_model_dir)
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        info = next(line for line in metrics.splitlines() if line.startswith("deepclust_model_info{"))
        assert card.files["model.int8.onnx"].sha256[:12] in info, info  # the INT8 file is what runs
        workers = [p for p in _descendants(server.pid) if "model_service_worker" in " ".join(p.cmdline())]
        assert workers, "no TorchServe worker found"
        for worker in workers:
            assert Path(worker.exe()).resolve() == torchless_python.resolve() or worker.exe().startswith(
                str(torchless_python.parent)
            ), worker.exe()
            assert "ts_shim" in worker.environ().get("PYTHONPATH", ""), "the worker did not get the torch stand-in"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        shutil.rmtree(cache, ignore_errors=True)


def _descendants(pid: int):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_the_torchless_environment_is_what_the_serve_extra_promises(torchless_python):
    """The stand-in is the only torch the worker sees: importing torch through it fails loudly on real use."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import torch; print(json.dumps(torch.__name__))"
    shim = str(REPO_ROOT / "serving" / "hosts" / "torchserve" / "ts_shim")
    run = subprocess.run(
        [str(torchless_python), "-c", "import json; " + code, shim], capture_output=True, text=True, env=_env()
    )
    assert run.returncode == 0 and json.loads(run.stdout) == "torch", run.stderr
    assert sys.executable != str(torchless_python)
