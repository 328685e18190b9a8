"""`deepclust train DIR` on folders it has never seen: PNG folders built from the shared data, no settings.

    python benchmarks/own_folder.py --only digits fashion5 cifar4          # the cheap folders
    python benchmarks/own_folder.py --only fashion cifar10 cifar6           # the rest (each ~10-15 min here)
    python benchmarks/own_folder.py --only digits --mode default            # only the no-settings run

Each folder is written once (PNG files in ImageFolder layout, class sub-folders; labels are only read back to score
the result) under `$DEEPCLUST_CACHE/own_folder/<name>` and kept, so that re-runs hit the frozen-feature cache.
For every folder two commands run in a fresh process each, exactly as a user types them:

- `deepclust train DIR` (mode `default`: K from the folder's class sub-folders when it has them, otherwise estimated);
- `deepclust train DIR --k auto` (mode `k_auto`: K estimated without labels, even when the folder has them).

Rows (`benchmarks/results/own_folder.json`, keyed by dataset and mode): dataset, mode, k_true, k_estimated, k_used,
recipe, backbone, acc/nmi/ari at the K used, seconds (wall time of the command), the budget (default `auto`: steps
per recipe, the same whatever the load; `steps` per recipe; `planned_seconds_reference_machine`), the 1-min load
average at start and end (the wall time depends on it, the result does not), command, commit, machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402

FASHION_CLASSES = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]  # fmt: skip
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def data_root() -> Path:
    return Path(os.environ.get("DEEPCLUST_DATA", ROOT.parent / "shared" / "data"))


def cache_root() -> Path:
    return Path(os.environ.get("DEEPCLUST_CACHE", Path.home() / ".cache" / "deepclust"))


# ------------------------------------------------------------------------------------------------ the images
def fashion_test() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST test (10,000 grey 28x28 images)."""
    base = data_root() / "fashion-mnist"

    def read(name: str) -> np.ndarray:
        with gzip.open(base / name, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)

    return read("t10k-images-idx3-ubyte.gz"), read("t10k-labels-idx1-ubyte.gz").astype(np.int64), FASHION_CLASSES


def sklearn_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All 1,797 of sklearn's 8x8 digits (0..16 grey levels scaled to 0..255)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    return images, bunch.target.astype(np.int64), [str(i) for i in range(10)]


def cifar10_test() -> tuple[list[bytes], np.ndarray, list[str]]:
    """CIFAR-10 test (10,000 colour 32x32 images) as the JPEG bytes of the shared tar."""
    records: list[tuple[str, str, bytes]] = []
    with tarfile.open(data_root() / "cifar10" / "test.tar") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None and member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                records.append((Path(member.name).parts[-2], member.name, handle.read()))
    records.sort(key=lambda r: r[1])
    names = sorted({r[0] for r in records})
    labels = np.array([names.index(r[0]) for r in records], dtype=np.int64)
    return [r[2] for r in records], labels, names


def _first_classes(source: Callable[[], tuple[Any, np.ndarray, list[str]]], count: int) -> Callable:
    """The same images restricted to the first `count` classes (a fixed rule, not a chosen subset)."""

    def build() -> tuple[Any, np.ndarray, list[str]]:
        images, labels, names = source()
        keep = np.flatnonzero(labels < count)
        picked = [images[i] for i in keep] if isinstance(images, list) else images[keep]
        return picked, labels[keep], names[:count]

    return build


FOLDERS: dict[str, Callable[[], tuple[Any, np.ndarray, list[str]]]] = {
    "digits": sklearn_digits,
    "fashion": fashion_test,
    "fashion5": _first_classes(fashion_test, 5),
    "cifar4": _first_classes(cifar10_test, 4),
    "cifar6": _first_classes(cifar10_test, 6),
    "cifar10": cifar10_test,
}
CHEAP = ["digits", "fashion5", "cifar4"]


def build_folder(name: str, root: Path | None = None) -> Path:
    """`<root>/<name>/<class>/<index>.png`, written once (a `.complete` marker; files never rewritten, so their
    modification times, part of the feature cache key, stay put)."""
    target = (root or cache_root() / "own_folder") / name
    marker = target / ".complete"
    if marker.exists():
        return target
    images, labels, class_names = FOLDERS[name]()
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = target / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:05d}.png"
        if isinstance(image, bytes):  # CIFAR JPEG: decoded once, stored losslessly as PNG
            import io

            with Image.open(io.BytesIO(image)) as decoded:
                decoded.convert("RGB").save(path)
        else:
            Image.fromarray(np.asarray(image)).save(path)
    marker.write_text(json.dumps({"images": len(labels), "classes": class_names}))
    return target


def folder_labels(folder: Path) -> tuple[int, int]:
    """(images, classes) of an ImageFolder layout."""
    classes = [d for d in folder.iterdir() if d.is_dir()]
    return sum(len(list(d.glob("*.png"))) for d in classes), len(classes)


# ------------------------------------------------------------------------------------------------ the runs
MODES: dict[str, list[str]] = {"default": [], "k_auto": ["--k", "auto"]}


def run_one(name: str, mode: str, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    """`deepclust train DIR [--k auto]` in a fresh process (the allocator setting of the other benchmarks), then
    read the run's `auto.json` and `metrics.json`."""
    folder = build_folder(name)
    n_images, k_true = folder_labels(folder)
    run_name = f"{name}-{mode}"
    args = ["train", str(folder), "--out-dir", str(out_dir), "--name", run_name, *MODES[mode], *extra]
    command = "deepclust " + " ".join(args)
    env = {**os.environ, **ALLOCATOR, "DEEPCLUST_DATA": str(data_root())}
    load_before = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "deepclust"), *args], env=env, capture_output=True, text=True
    )
    seconds = round(time.perf_counter() - started, 1)
    run_dir = out_dir / run_name
    (out_dir / f"{run_name}.stderr.log").write_text(done.stderr)
    (out_dir / f"{run_name}.stdout.log").write_text(done.stdout)  # the choices and WARNING lines the user sees
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr[-3000:]}")
    auto = json.loads((run_dir / "auto.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    warnings = json.loads((run_dir / "warnings.json").read_text()) if (run_dir / "warnings.json").exists() else []
    k_info = auto.get("k", {})
    return {
        "dataset": name,
        "mode": mode,
        "n_images": n_images,
        "k_true": k_true,
        "k_estimated": k_info.get("estimated"),
        "k_used": k_info.get("value"),
        "k_source": k_info.get("source"),
        "recipe": auto.get("recipe", {}).get("name"),
        "backbone": auto.get("recipe", {}).get("backbone"),
        "selection": auto.get("selection", {}).get("chosen") if auto.get("selection") else None,
        "acc": metrics.get("acc"),
        "nmi": metrics.get("nmi"),
        "ari": metrics.get("ari"),
        "seconds": seconds,
        "budget": auto.get("budget", {}).get("asked"),
        "budget_deterministic": auto.get("budget", {}).get("deterministic"),
        "planned_seconds_reference_machine": auto.get("budget", {}).get("planned_seconds"),
        "steps": {z.get("recipe"): z.get("steps") for z in auto.get("sizing", [])},
        "load_average_1min": [load_before, round(os.getloadavg()[0], 2)],  # at start and end: seconds depend on it
        "warnings": [w.get("kind") for w in warnings],
        "run_dir": str(run_dir),
        "command": command,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(FOLDERS), default=CHEAP, help=f"default: {CHEAP}")
    parser.add_argument("--mode", nargs="+", choices=sorted(MODES), default=["default", "k_auto"])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "own_folder")
    parser.add_argument("--build-only", action="store_true", help="only write the folders")
    parser.add_argument("extra", nargs="*", help="extra arguments for deepclust train (e.g. --budget 5m)")
    args = parser.parse_args(argv)
    if args.build_only:
        for name in args.only:
            print(build_folder(name), folder_labels(build_folder(name)))
        return 0
    rows = []
    for name in args.only:  # one folder at a time: the machine is shared
        for mode in args.mode:
            row = run_one(name, mode, args.out_dir, args.extra)
            row.update(provenance())
            row["bench_command"] = "python benchmarks/own_folder.py " + " ".join(sys.argv[1:] if argv is None else argv)
            rows.append(row)
            write_rows("own_folder", [row], merge_on=("dataset", "mode"))
            print(json.dumps(row), flush=True)
    print_table(rows, ["dataset", "mode", "k_true", "k_estimated", "recipe", "acc", "nmi", "ari", "seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
