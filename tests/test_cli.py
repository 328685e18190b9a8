"""The `deepclust` command line: complete --help, one-line errors for a missing optional install (tested in a real
serve-only environment), and the process settings (malloc, threads) in force when started without `make`."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, cache_dir, free_port
from PIL import Image
from typer.testing import CliRunner

from deepclust.cli import app
from deepclust.extras import COMMANDS, EXTRAS

COMMAND_NAMES = ["train", "evaluate", "export", "serve", "predict", "label", "monitor"]
BIN = Path(sys.executable).parent
MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user who did not go through `make`: no malloc variables, no thread settings."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS and not k.startswith("DEEPCLUST_LOG")}
    return {**env, **extra}


# The options the README and docs/design.md (section 5) tell users to type: a rename or a lost option fails here.
DOCUMENTED_OPTIONS = {
    "train": {"--config", "--method", "--name", "--out-dir"},
    "evaluate": {"--split", "--dataset", "--root", "--output"},
    "export": {"--output", "--int8", "--fp16", "--parity-images", "--rebuild-command"},
    "serve": {"--model", "--variant", "--host", "--port", "--token-auth", "--management", "--workers"},
    "predict": {"--url", "--model", "--token", "--key-file"},
    "label": {"--model", "--variant", "--output", "--errors", "--shard", "--shard-count", "--gallery"},
    "monitor": {"--model", "--variant", "--sample", "--reference", "--pushgateway", "--textfile", "--json"},
}


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_help_is_complete(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "not implemented" not in result.output.lower()
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", result.output))
    missing = DOCUMENTED_OPTIONS[command] - shown
    assert not missing, f"deepclust {command} --help lacks {sorted(missing)}"


def test_console_script_lists_every_command() -> None:
    exe = BIN / "deepclust"
    assert exe.exists(), "the deepclust console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in COMMAND_NAMES:
        assert command in out.stdout


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--config", "/nonexistent.yaml"]).exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: -1}\n")
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "lr" in result.output


def test_extras_map_matches_pyproject() -> None:
    """deepclust/extras.py names, per extra, the modules its distributions install (read from the installed
    distributions), so the one-line message names the right extra."""
    from importlib.metadata import packages_distributions

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    modules_of: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    for extra in ("train", "serve"):
        for requirement in extras[extra]:
            dist = re.split(r"[=<>\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            if dist in ("pyyaml", "pillow", "pydantic"):  # also base dependencies: never missing
                continue
            provided = {m for m in modules_of.get(dist, set()) if not m.startswith("_")}
            if dist == "onnxruntime-gpu":
                provided = {"onnxruntime"}
            assert provided & set(EXTRAS[extra]), f"{dist} ({extra}) installs {provided}, none in EXTRAS"
    for extra, needed in COMMANDS.values():
        assert set(needed) <= set(EXTRAS[extra])


# ------------------------------------------------------------------------------------ serve-only environment
def _serve_requirements() -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return sorted({*project["dependencies"], *project["optional-dependencies"]["serve"]})


@pytest.fixture(scope="session")
def serve_only_python() -> Path:
    """A real venv with exactly the base dependencies + the `serve` extra (no torch), as `make serve` installs.

    Built once per machine into the cache (keyed by the requirements and the interpreter; ~1 min from the local
    wheel index, measured) and reused; the project itself comes from this checkout through PYTHONPATH."""
    requirements = _serve_requirements()
    key = hashlib.sha256(json.dumps([sys.version, requirements]).encode()).hexdigest()[:12]
    venv = cache_dir() / f"venv-serve-{key}"
    python = venv / "bin" / "python"
    with open(cache_dir() / f".venv-serve-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            subprocess.run(["rm", "-rf", str(venv)], check=True)
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
            pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements]
            done = subprocess.run(pip, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, done.stderr[-3000:]
            (venv / ".complete").touch()
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0, "the serve-only environment must not have torch"
    return python


def serve_only(python: Path, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    env = clean_env(PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [python, "-m", "deepclust.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
        **kwargs,
    )


def assert_one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["train", "-c", "configs/digits_cc_tiny.yaml"],
        ["evaluate", "runs/nothing"],
        ["export", "runs/nothing", "-o", "model_store/nothing"],
    ],
    ids=["train", "evaluate", "export"],
)
def test_torch_commands_in_serve_only_env_say_which_extra(serve_only_python: Path, args: list[str]) -> None:
    result = serve_only(serve_only_python, *args)
    line = assert_one_line(result, f"deepclust {args[0]}:", "torch is not installed", "'train' extra")
    assert re.search(r"pip install -e '\.\[train\]'", line), line
    assert result.stdout == ""


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (folder / name).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def test_label_and_monitor_run_in_serve_only_env(
    serve_only_python: Path, tiny_model_dir: Path, image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "labels.parquet"
    labelled = serve_only(serve_only_python, "label", str(image_folder), "-m", str(tiny_model_dir), "-o", str(out))
    assert labelled.returncode == 0, labelled.stderr
    assert out.stat().st_size > 0 and "Traceback" not in labelled.stderr
    monitored = serve_only(
        serve_only_python, "monitor", "--model", str(tiny_model_dir), "--reference", str(image_folder)
    )
    assert monitored.returncode == 0, monitored.stderr
    assert json.loads(monitored.stdout)["labelled"]["n"] == 12


def test_predict_without_a_service_is_one_line(serve_only_python: Path, image_folder: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = serve_only(serve_only_python, "predict", str(image_folder / "cat" / "0.png"), "--url", url)
    assert_one_line(result, "deepclust predict:")


@contextlib.contextmanager
def _serving(python: Path, config: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [python, "-m", "deepclust.cli", "serve", "-c", str(config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children are listed per thread: the JVM starts its workers from other threads)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in children.read_text().split()]
    return found + [grand for child in found for grand in _descendants(child)]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_serve_runs_in_serve_only_env_and_its_workers_get_the_malloc_setting(
    serve_only_python: Path, tiny_model_dir: Path, image_folder: Path, tmp_path: Path
) -> None:
    """`deepclust serve` without torch and without `make`: it answers, and the TorchServe Python worker (a
    grandchild, started by the JVM) runs with glibc's malloc variables, which glibc reads when it starts."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "port": port,
                "metrics_port": free_port(),
                "torchserve_metrics_port": free_port(),
                "cache_dir": str(tmp_path / "cache"),
                "startup_timeout_s": 240,
            }
        )
    )
    env = clean_env(PYTHONPATH=str(REPO_ROOT))
    with _serving(serve_only_python, config, env) as process:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:  # noqa: S310
                    if response.status == 200 and b"Healthy" in response.read():
                        break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("deepclust serve did not become healthy")
        predicted = serve_only(
            serve_only_python, "predict", str(image_folder / "cat" / "0.png"), "--url", f"http://127.0.0.1:{port}",
            "--model", tiny_model_dir.name,
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
        assert "cluster" in json.loads(predicted.stdout)
        workers = [
            pid
            for pid in _descendants(process.pid)
            if "model_service_worker" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        ]
        assert workers, "no TorchServe Python worker found"
        for pid in workers:
            environ = _environ(pid)
            assert environ.get("MALLOC_MMAP_MAX_") == "0" and environ.get("MALLOC_TRIM_THRESHOLD_") == "100000000000"
    assert process.returncode is not None


def test_missing_serve_module_is_one_line_naming_serve(tmp_path: Path, tiny_model_dir: Path, image_folder: Path):
    """The other direction (an install without the serve extra): onnxruntime hidden by an import hook."""
    hook = tmp_path / "hide"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'onnxruntime':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    env = clean_env(PYTHONPATH=os.pathsep.join([str(hook), str(REPO_ROOT)]))
    result = subprocess.run(
        [BIN / "deepclust", "label", str(image_folder), "-m", str(tiny_model_dir), "-o", str(tmp_path / "l.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO_ROOT,
    )
    assert_one_line(result, "deepclust label:", "onnxruntime is not installed", "'serve' extra", "[serve]")


# ------------------------------------------------------------------------------------------ process settings
def _runtime_line(stderr: str) -> dict:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"event": "runtime"')]
    assert len(lines) == 1, stderr
    return lines[0]


PROBE = "from serving.core.runtime import malloc_probe; import json; print(json.dumps(malloc_probe()))"


def test_malloc_setting_is_in_force_without_make(tiny_model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    """The console script started with a clean environment: glibc itself (mallinfo2) says a 64 MiB block comes
    from the heap and stays there after free. Control: the same probe in a plain interpreter sees an mmap."""
    plain = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=clean_env(), cwd=REPO_ROOT
    )
    assert json.loads(plain.stdout) == {"large_block_mmapped": True, "heap_trimmed_on_free": False}
    result = subprocess.run(
        [BIN / "deepclust", "label", str(image_folder), "-m", str(tiny_model_dir), "-o", str(tmp_path / "l.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(DEEPCLUST_LOG_LEVEL="DEBUG"),
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    state = _runtime_line(result.stderr)
    assert state["allocator_tuned"] is True
    assert state["malloc"] == {"large_block_mmapped": False, "heap_trimmed_on_free": False}
    off = subprocess.run(
        [BIN / "deepclust", "label", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(DEEPCLUST_LOG_LEVEL="DEBUG", DEEPCLUST_TUNE_MALLOC="0"),
        cwd=REPO_ROOT,
    )
    assert _runtime_line(off.stderr)["malloc"]["large_block_mmapped"] is True  # the opt-out really is glibc's default


def test_train_threads_follow_the_cpus_available(tmp_path: Path) -> None:
    """Pinned to one CPU (as a cgroup or `taskset` would), `deepclust train` runs torch with one thread, as torch
    itself reports; without the pin it uses every CPU the process may use."""
    from serving.core.runtime import available_cpus

    def torch_threads(*prefix: str) -> int:
        result = subprocess.run(
            [*prefix, BIN / "deepclust", "train", "-c", "configs/digits_cc_tiny.yaml", "--out-dir", str(tmp_path),
             "optim.epochs=1", "data.subset=256"],
            capture_output=True, text=True, timeout=600, env=clean_env(), cwd=REPO_ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runtime = [json.loads(line) for line in result.stderr.splitlines() if '"torch_threads"' in line]
        assert len(runtime) == 1, result.stderr[-3000:]
        assert runtime[0]["malloc"]["large_block_mmapped"] is False
        return runtime[0]["torch_threads"]

    assert torch_threads("taskset", "-c", "0") == 1
    assert torch_threads() == available_cpus()


def test_cpu_quota_parsing(tmp_path: Path) -> None:
    """cgroup v2 quotas along the process's cgroup path: the tightest wins; 'max' is no limit."""
    from serving.core.runtime import cgroup_cpu_limit, parse_cpu_max

    assert parse_cpu_max("max 100000") is None and parse_cpu_max("150000 100000") == 1.5
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "a" / "b" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    assert cgroup_cpu_limit(tmp_path, proc) == 3.0
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(tmp_path, proc) == 0.5
