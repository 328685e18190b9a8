"""`deepclust serve`: configuration, the `.mar` archive, a generated `config.properties`, TorchServe in the
foreground behind a small HTTP front.

Processes and ports (defaults):
- the HTTP front (`front.py`, an asyncio thread of this process) on the inference address `host:port`
  (127.0.0.1:8080): what clients, probes and `curl --data-binary @cat.jpg …/predictions/<model>` talk to. It forwards
  to TorchServe with keep-alive, turns form-encoded or untyped prediction uploads into `application/octet-stream`
  (TorchServe would answer those with a 500), enforces `max_request_bytes` (413), `max_header_bytes` (431),
  `read_timeout_s` / `keepalive_timeout_s`, answers 502 while TorchServe is down, and measures the end-to-end
  request latency;
- TorchServe's inference API on an internal loopback port (`backend_port`, a free one by default);
- our Prometheus metrics (workers' aggregate + the front's) on `metrics_host:metrics_port` (127.0.0.1:8082);
- TorchServe's own metrics API on 127.0.0.1:`torchserve_metrics_port` (8083).
Start order: metrics endpoint, front (a busy port fails before the JVM starts), TorchServe; ready once `/ping` and a
real prediction answer *through the front*. Stop order: front, TorchServe (process group), metrics endpoint.

Why we start TorchServe's Java frontend ourselves instead of the `torchserve` launcher: the launcher keeps one global
pid file in /tmp and refuses a second instance on the machine, and it leaves the JVM in our terminal's process group.
We start the JVM in its own session (its Python workers follow), so that Ctrl-C or SIGTERM on `deepclust serve` stops
the whole tree cleanly (SIGTERM, then SIGKILL after a grace period), and several instances (tests, `make serve`) can
run side by side. Each instance gets a private state directory (config, logs, token key file, metrics files) and
private worker socket numbers.

Security defaults: inference on 127.0.0.1; the management API is OFF (bound to a unix socket inside the 0700 state
directory, unreachable over TCP — TorchServe 0.12 cannot disable it) or `loopback`; model registration through the API
disabled; `allowed_urls` restricted to our archive directory; no per-model pip installs; no config snapshots.

TorchServe 0.12 always starts two gRPC servers (inference and management) and has no setting to turn them off or to
bind them to a unix socket (`grpc_*_address` is an IP). Its only lock on them is token authorization, so TorchServe
ALWAYS runs with it: gRPC management needs the management key, which sits in the 0700 state directory, so no other
local user can call ScaleWorker, UnregisterModel or RegisterModel. Whether *clients* need a token is our own setting:
`token_auth` `auto` = off only when the front and the metrics are bound to loopback, on otherwise. Off, the front puts
TorchServe's inference key on every forwarded request itself; on, the client's `Authorization` header is forwarded
and TorchServe checks it (the key file is chmod 0600 and its path printed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from serving.core.contract import CARD_NAME, sha256_file
from serving.hosts.serve.config import (  # noqa: F401 - re-exported: callers import them from here
    ServeConfig,
    _is_loopback,
    _url_host,
    check_gpu,
    default_cache_dir,
    verify_model,
)
from serving.hosts.serve.lifecycle import ManagedHost, common_ready_lines, run_in_foreground

log = logging.getLogger("deepclust.serve")
HANDLER_SOURCE = Path(__file__).with_name("handler.py")  # copied into the .mar archive by torch-model-archiver
TS_SHIM = Path(__file__).resolve().with_name("ts_shim")  # the torch stand-in for TorchServe's worker
INTERNAL_TOKEN_MINUTES = 100 * 365 * 24 * 60  # TorchServe's keys when only the front uses them: never expire

# TorchServe's logging (log4j2), replacing the configuration inside its jar. Measured (benchmarks/serve_load.py, issue
# #21): the jar's configuration writes every request several times (BatchAggregator "Sending response" and RestJob
# "Waiting time" at INFO/DEBUG, the access log), `org.pytorch.serve` reaches ts_log.log twice (its own appender + the
# root's), and every batch adds 4 lines: ≈ 1.5 ms of JVM CPU per image at 32 concurrent clients, a fifth of the
# engine's own cost. Here: the same files, each line once; per-request and per-batch lines dropped (the front counts
# and times every request: deepclust_request_duration_seconds; the handler records batches: deepclust_batch_size);
# everything else kept as before: start-up, worker and error lines in ts_log.log and on stdout (`kubectl logs`), the
# workers' output (the handler's ready line, tracebacks) in model_log.log and on stdout.
LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by `deepclust serve` (serving/hosts/torchserve/server.py) at each start. -->
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
    <RollingFile name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/ts_log.%d{dd-MMM}.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>
    <RollingFile name="model_log" fileName="${env:LOG_LOCATION:-logs}/model_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/model_log.%d{dd-MMM}.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve.wlm.BatchAggregator" level="warn"/>
    <Logger name="org.pytorch.serve.job" level="warn"/>
    <Logger name="org.pytorch.serve.wlm" level="info">
      <RegexFilter regex="(Looping backend response at|Backend response time|result=\\[METRICS\\]).*"
                   useRawMsg="false" onMatch="DENY" onMismatch="NEUTRAL"/>
    </Logger>
    <Logger name="MODEL_LOG" level="all">
      <RegexFilter regex="Backend received inference at.*" useRawMsg="false" onMatch="DENY" onMismatch="NEUTRAL"/>
      <AppenderRef ref="model_log"/>
    </Logger>
    <Root level="info">
      <AppenderRef ref="STDOUT"/>
      <AppenderRef ref="ts_log"/>
    </Root>
  </Loggers>
</Configuration>
"""


# ------------------------------------------------------------------------------------------------ archive
def archive_stamp(config: ServeConfig, handler: Path = HANDLER_SOURCE) -> str:
    """Digest of everything inside the archive: a change of model, card or handler makes it stale."""
    digest = hashlib.sha256(b"archive-layout-2")  # bump when the archiver arguments change
    for path in (*config.model_files, config.model_dir / CARD_NAME, handler):
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.suffix != ".onnx" else sha256_file(path).encode())
    return digest.hexdigest()[:16]


def build_archive(config: ServeConfig, handler: Path = HANDLER_SOURCE) -> Path:
    """Build `<cache>/mar/<stamp>/<model>.mar` with torch-model-archiver unless an up-to-date one exists."""
    stamp = archive_stamp(config, handler)
    store = config.cache_dir / "mar" / stamp
    mar = store / f"{config.model_name}.mar"
    if mar.is_file():
        return mar
    store.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=store.parent))
    try:
        extra = ",".join(str(p) for p in (*config.model_files, config.model_dir / CARD_NAME))
        archiver = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or shutil.which(
            "torch-model-archiver"
        )
        if archiver is None:
            raise RuntimeError("torch-model-archiver not found: install the 'serve' extra")
        cmd = [
            archiver,
            "--model-name",
            config.model_name,
            "--version",
            "1.0",  # the `models` property is keyed by this version; the stamp names the folder
            "--handler",
            str(handler),
            "--extra-files",
            extra,
            "--export-path",
            str(staging),
            "--archive-format",
            "zip-store",
            "--force",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed: {result.stderr.strip() or result.stdout.strip()}")
        built = staging / f"{config.model_name}.mar"
        store.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            built.rename(mar)  # atomic; if another process won the race its archive is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built archive %s", mar)
    return mar


# ------------------------------------------------------------------------------------------ config.properties
def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_worker_port(workers: int) -> int:
    """TorchServe workers talk over /tmp/.ts.sock.<port+i>: pick numbers no other instance uses."""
    for _ in range(200):
        port = random.randint(20_000, 60_000 - workers)
        if not any(Path(f"/tmp/.ts.sock.{port + i}").exists() for i in range(workers + 4)):  # noqa: S108
            return port
    raise RuntimeError("no free TorchServe worker port found")


def _prop_escape(value: str) -> str:
    return value.replace("\\", "\\\\")


def render_properties(config: ServeConfig, store: Path, state: Path, backend_port: int | None = None) -> str:
    """The generated TorchServe `config.properties` (documented key by key). TorchServe's inference API listens on
    127.0.0.1:`backend_port` only: clients reach it through the HTTP front (`front.py`) on `config.port`."""
    backend_port = backend_port or config.backend_port or _free_loopback_port()
    if config.management == "loopback":
        management = f"http://127.0.0.1:{config.management_port}"
    else:
        management = f"unix:{state / 'management.sock'}"  # unreachable over TCP: "off"
    models = {
        config.model_name: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{config.model_name}.mar",
                "minWorkers": config.workers,
                "maxWorkers": config.workers,
                "batchSize": config.batch_size,
                "maxBatchDelay": config.max_batch_delay_ms,
                "responseTimeout": config.response_timeout_s,
            }
        }
    }
    props = {
        "inference_address": f"http://127.0.0.1:{backend_port}",
        "management_address": management,
        "metrics_address": f"http://127.0.0.1:{config.torchserve_metrics_port}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": _free_loopback_port(),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": _free_loopback_port(),
        "use_native_io": "true",
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "disable_system_metrics": "true",
        "model_store": _prop_escape(str(store)),
        "load_models": f"{config.model_name}.mar",
        "models": json.dumps(models),
        "enable_model_api": "false",
        # Always on: the only lock on TorchServe's gRPC management service (module docstring). With client auth off
        # the keys never leave this process and the state directory, so they do not expire for the service's life.
        "disable_token_authorization": "false",
        "token_expiration_min": config.token_expiration_min if config.auth_enabled else INTERNAL_TOKEN_MINUTES,
        "allowed_urls": _prop_escape(f"file://{re.escape(str(store))}/[^/]+\\.mar"),
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        "initial_worker_port": _free_worker_port(config.workers),
        "default_workers_per_model": config.workers,
        "max_request_size": config.max_request_bytes,
        "max_response_size": 16 * (1 << 20),
        "default_response_timeout": config.response_timeout_s,
        "job_queue_size": 1000,
        "async_logging": "true",
    }
    lines = ["# Generated by `deepclust serve`: edit serve settings (YAML/CLI), not this file."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- process
class TorchServeHost(ManagedHost):
    """One TorchServe instance for one model: `start()`, `wait_ready()`, `stop()`; also a context manager."""

    def __init__(self, config: ServeConfig, handler: Path = HANDLER_SOURCE) -> None:
        self.config = config
        self.handler = handler  # another handler file only for benchmarks (the eager baseline)
        self.process: subprocess.Popen | None = None
        self.metrics_server = None
        self.front = None
        self.backend_port = config.backend_port or 0
        self.state = config.cache_dir / "serve" / f"{config.model_name}-{config.port}"
        self.log_dir = config.log_dir or self.state / "logs"
        self.multiproc_dir = self.state / "prometheus-multiproc"
        self.archive_dir: Path | None = None
        self._token: str | None = None

    @property
    def key_file(self) -> Path:
        return self.state / "key_file.json"

    def inference_token(self) -> str | None:
        """TorchServe's inference key (None until TorchServe has written its key file). TorchServe always checks
        it; clients need it only with token authorization on (off, the front adds it). Cached: the keys live as long
        as the TorchServe process."""
        if self._token is None and self.key_file.is_file():
            try:
                self._token = json.loads(self.key_file.read_text())["inference"]["key"]
            except (OSError, ValueError, KeyError):
                return None  # being written
        return self._token

    def prepare(self) -> Path:
        """Verify the model, build the archive and write the state directory; returns the config file."""
        verify_model(self.config)
        if self.config.require_gpu:
            check_gpu(self.config)
        mar = build_archive(self.config, self.handler)
        if self.state.exists():
            for stale in ("key_file.json", "management.sock", "config.properties"):
                (self.state / stale).unlink(missing_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.archive_dir = mar.parent
        properties = self.state / "config.properties"
        self.backend_port = self.config.backend_port or _free_loopback_port()
        properties.write_text(render_properties(self.config, mar.parent, self.state, self.backend_port))
        (self.state / "log4j2.xml").write_text(LOG4J2_XML)
        return properties

    def command(self, properties: Path) -> list[str]:
        import ts

        ts_home = Path(ts.__file__).resolve().parents[1]
        return [
            self.config.java,
            f"-Dmodel_server_home={ts_home}",
            f"-Xmx{self.config.jvm_heap}",
            f"-Djava.io.tmpdir={self.state}",
            f"-Dlog4j.configurationFile={(self.state / 'log4j2.xml').as_uri()}",
            "-cp",
            f".:{ts_home / 'ts' / 'frontend' / '*'}",
            "org.pytorch.serve.ModelServer",
            "--python",
            sys.executable,
            "-f",
            str(properties),
            "-s",
            str(self.archive_dir),
            "-ncs",
        ]

    def environment(self) -> dict[str, str]:
        from serving.core.runtime import allocator_environment
        from serving.hosts.serve.telemetry import MULTIPROC_ENV
        from serving.hosts.torchserve.handler import CONFIG_ENV

        env = allocator_environment(dict(os.environ))  # glibc reads it when each Python worker starts
        env.update(
            {
                MULTIPROC_ENV: str(self.multiproc_dir),
                CONFIG_ENV: json.dumps(self.config.handler_config()),
                "LOG_LOCATION": str(self.log_dir),
                "METRICS_LOCATION": str(self.log_dir),
                "TEMP": str(self.state),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Thread pools: onnxruntime decides from intra_op_threads; keep the others from oversubscribing.
        env.setdefault("OMP_NUM_THREADS", "1")
        if importlib.util.find_spec("torch") is None:
            # TorchServe's worker imports torch only for an isinstance check; the serve install has none.
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TS_SHIM), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> None:
        """Start order: metrics endpoint, HTTP front (binds the public port: a busy port fails before the JVM
        starts; it answers 502 until TorchServe is up), then TorchServe."""
        from serving.hosts.serve.front import Front, settings_from
        from serving.hosts.serve.telemetry import (
            FrontMetrics,
            multiprocess_registry,
            prepare_multiprocess_dir,
            start_metrics_server,
        )
        from serving.hosts.torchserve.front import TorchServeBackend

        properties = self.prepare()
        self._token = None  # a new TorchServe process writes new keys
        prepare_multiprocess_dir(self.multiproc_dir)
        registry = multiprocess_registry(self.multiproc_dir)
        front_metrics = FrontMetrics(registry)
        self.metrics_server = start_metrics_server(
            self.config.metrics_host, self.config.metrics_port, self.multiproc_dir, registry
        )
        backend = TorchServeBackend(
            self.backend_port, self.config.model_name, self.inference_token, workers=self.worker_pids
        )
        self.front = Front(settings_from(self.config, self.inference_token), backend, front_metrics)
        self.front.start()
        stdout = open(self.log_dir / "torchserve.out", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            self.command(properties),
            cwd=self.state,
            env=self.environment(),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stdout.close()

    def wait_ready(self) -> None:
        """Block until the model answers a real prediction (the warm-up, which makes the front's `/ping` ready) or
        raise with the log tail."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        ping = f"http://127.0.0.1:{self.backend_port}/ping"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited during start-up:\n{self.log_tail()}")
            try:
                # TorchServe refuses even /ping without its key (400): send it (empty until the key file exists).
                request = urllib.request.Request(ping, headers=self.auth_headers())  # noqa: S310 - our own URL
                with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - our own URL
                    healthy = json.loads(response.read()).get("status") == "Healthy"
            except (urllib.error.URLError, OSError, ValueError):
                healthy = False
            if healthy and self._model_answers():
                if self.key_file.exists():
                    os.chmod(self.key_file, 0o600)
                self.front.mark_ready()
                return
            time.sleep(0.3)
        raise TimeoutError(f"TorchServe not ready after {self.config.startup_timeout_s}s:\n{self.log_tail()}")

    def _model_answers(self) -> bool:
        """Healthy /ping only says the frontend is up (it counts a starting worker as running): the model is ready
        once it has answered a real prediction (a small PNG) with a cluster. Sent to TorchServe's internal port so
        that it does not show up in the front's request metrics."""
        from serving.hosts.serve.front import warmup_image

        request = urllib.request.Request(  # noqa: S310 - our own http URL
            f"http://127.0.0.1:{self.backend_port}/predictions/{self.config.model_name}",
            data=warmup_image(),
            method="POST",
            headers={"Content-Type": "image/png", **self.auth_headers()},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                answer = json.loads(response.read())
            return isinstance(answer, list) and "cluster" in answer[0]
        except (urllib.error.URLError, OSError, ValueError, IndexError, TypeError):
            return False

    def worker_pids(self) -> list[int]:
        """TorchServe's Python workers (children of the JVM that run `model_service_worker`); empty while none runs.
        Watched by the front (`TorchServeBackend`): a worker that dies drops requests TorchServe never answers."""
        import psutil

        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        pids = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if any("model_service_worker" in part for part in child.cmdline()):
                    pids.append(child.pid)
        return sorted(pids)

    def auth_headers(self) -> dict[str, str]:
        token = self.inference_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            path = self.log_dir / name
            if path.is_file():
                chunks.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(chunks)

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the front (no new requests), SIGTERM the JVM's process group (workers included), SIGKILL after
        `grace_s`, stop the metrics endpoint; idempotent."""
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_s)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # stragglers (workers) of the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        if self.metrics_server is not None:
            server, _thread = self.metrics_server
            server.shutdown()
            server.server_close()
            self.metrics_server = None
        (self.state / "management.sock").unlink(missing_ok=True)


def serve_forever(config: ServeConfig, echo=print) -> int:
    """Start, print where everything is, block until Ctrl-C/SIGTERM or TorchServe exits; exit code."""
    host = TorchServeHost(config)

    def ready() -> list[str]:
        head, tail = common_ready_lines(config, host.key_file)
        management = f"http://127.0.0.1:{config.management_port}" if config.management == "loopback" else "off"
        return [
            f"ready: POST images to {config.base_url}/predictions/{config.model_name}",
            *head,
            f"  TorchServe metrics: http://127.0.0.1:{config.torchserve_metrics_port}/metrics",
            f"  TorchServe inference API (internal, behind the front): http://127.0.0.1:{host.backend_port}",
            f"  management API: {management}",
            *tail,
            f"  logs: {host.log_dir}   (Ctrl-C stops)",
        ]

    def wait() -> int:
        code = host.process.wait()
        echo(f"TorchServe exited with code {code}\n{host.log_tail()}")
        return 1

    files = ", ".join(p.name for p in config.model_files)
    return run_in_foreground(
        host,
        starting=f"deepclust serve: starting TorchServe for {config.model_name} ({files}, variant {config.variant}) …",
        ready=ready,
        wait=wait,
        stopping="stopping TorchServe …",
        echo=echo,
    )
