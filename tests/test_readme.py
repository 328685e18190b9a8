"""The README's "Use it" section is executable documentation: every shell block there runs here, as written.

Each block carries a marker line above it, `<!-- readme-test: NAME -->` or `<!-- readme-test: NAME skip: WHY -->`
(a block that cannot run on this machine: a GPU, hours of CPU, fixed ports of a long-running server, a cluster).
The runnable blocks run once, in README order, with `bash -eu` in one scratch folder that holds `configs/` and the
default model (as a checkout would), the environment's `deepclust` first on PATH, and real CIFAR-10 test images in
place of the README's `/data/photos`, `/data/probe` (class folders) and `/data/recent` (a flat sample). A block
passes when it exits 0 without a traceback and every file it names with `-o`, `--json`, `--gallery` or
`--textfile` exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
MARKER = re.compile(
    r"<!-- readme-test: (?P<name>[\w-]+)(?: skip: (?P<skip>[^\n]*?))? -->\n```bash\n(?P<body>.*?)```", re.S
)
OUTPUT_OPTION = re.compile(r"(?:-o|--output|--json|--gallery|--textfile)\s+'?([^\s']+)'?")


def use_it_section(text: str) -> str:
    start = text.index("\n## Use it\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def readme_blocks() -> list[tuple[str, str | None, str]]:
    """(name, skip reason or None, shell text) of every bash block of "Use it", in order."""
    section = use_it_section(README.read_text())
    blocks = [(m["name"], m["skip"], m["body"]) for m in MARKER.finditer(section)]
    return blocks


BLOCKS = readme_blocks()


def test_every_block_is_marked() -> None:
    """A new block without a marker would silently go untested."""
    section = use_it_section(README.read_text())
    assert section.count("```bash") == len(BLOCKS) > 0
    names = [name for name, _, _ in BLOCKS]
    assert len(set(names)) == len(names), names


def _link_images(target: Path, files: list[Path], labelled: bool) -> Path:
    for src in files:
        folder = target / src.parent.name if labelled else target
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{src.parent.name}-{src.name}").symlink_to(src)
    return target


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, cifar_test_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run every runnable block once, in README order (later blocks use what earlier ones made)."""
    scratch = tmp_path_factory.mktemp("readme")
    (scratch / "configs").symlink_to(REPO_ROOT / "configs")
    (scratch / "model_store").mkdir()
    (scratch / "model_store" / "cifar10-lite0").symlink_to(REPO_ROOT / "model_store" / "cifar10-lite0")
    classes = sorted(p for p in cifar_test_dir.iterdir() if p.is_dir())
    per_class = [sorted(c.glob("*.jpg")) for c in classes]
    substitutions = {
        "/data/photos": _link_images(scratch / "photos", [f for files in per_class for f in files[:6]], True),
        "/data/probe": _link_images(scratch / "probe", [f for files in per_class for f in files[6:12]], True),
        "/data/recent": _link_images(scratch / "recent", [f for files in per_class for f in files[12:24]], False),
    }
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("PYTHONPATH", None)
    done: dict[str, subprocess.CompletedProcess] = {}
    for name, skip, body in BLOCKS:
        if skip:
            continue
        script = body
        for placeholder, path in substitutions.items():
            script = script.replace(placeholder, str(path))
        done[name] = subprocess.run(
            ["bash", "-eu", "-c", script], cwd=scratch, env=env, capture_output=True, text=True, timeout=900
        )
        done[name].args = scratch  # where its outputs are
    return done


@pytest.mark.parametrize(("name", "skip", "body"), BLOCKS, ids=[name for name, _, _ in BLOCKS])
def test_readme_block(name: str, skip: str | None, body: str, results: dict[str, subprocess.CompletedProcess]) -> None:
    if skip:
        pytest.skip(f"README block {name!r}: {skip}")
    result = results[name]
    assert result.returncode == 0, f"README block {name!r} failed:\n{body}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    scratch = Path(result.args)
    for output in OUTPUT_OPTION.findall(body):
        path = scratch / output.replace("{shard}", "2")
        assert path.exists(), f"README block {name!r} should have written {output}"


def test_skips_say_why() -> None:
    for name, skip, _ in BLOCKS:
        if skip is not None:
            assert len(skip) > 20, f"README block {name!r} is skipped without a real reason"


def test_no_block_needs_a_path_the_test_does_not_provide() -> None:
    """Runnable blocks may only use the placeholders the fixture fills in (else they would fail on /data/...)."""
    for name, skip, body in BLOCKS:
        if not skip:
            unknown = set(re.findall(r"/data/\w+", body)) - {"/data/photos", "/data/probe", "/data/recent"}
            assert not unknown, f"{name}: {unknown}"
    assert shutil.which("bash")
