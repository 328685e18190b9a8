"""Process settings every entry point applies itself: glibc malloc tuned for large tensors, threads = cores available.

Why: with glibc's defaults every large tensor is a fresh `mmap` and every free a `munmap`, so a forward pass spends
more time in page faults than in arithmetic (EfficientNet-Lite0, batch 128, 2 threads: ~1.5 M minor faults per
batch and 3x slower). The Makefile exports the fix as environment variables, but glibc reads those only when the
process starts, so a command started without `make` never had them. `tune_allocator()` sets the same values in
the running process through `mallopt` (measured: 0 minor faults per batch, as with the variables) and exports the
variables so child processes (data-loader workers, TorchServe and its Python workers) start with them.

Threads: a container limited by a cgroup CPU quota still reports every host core to `os.cpu_count()` and to
OpenMP; `available_cpus()` takes the affinity mask and the quota into account.

Torch-free (ctypes and the standard library only): the CLI, training and every serving host use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from functools import cache
from pathlib import Path
from typing import Any

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
"""What the Makefile exports: no mmap for large blocks, never give the heap back (freed blocks are reused)."""
DISABLE_ENV = "DEEPCLUST_TUNE_MALLOC"
"""Set to 0 to keep glibc's defaults (for measuring what the setting is worth)."""
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int: a 2 GiB trim threshold is the closest to the variable's 1e11


class _Mallinfo2(ctypes.Structure):
    _fields_ = [  # ctypes layout of glibc struct mallinfo2
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@cache
def _glibc() -> Any:
    """The C library when it is glibc (it has `mallopt`), else None (musl, macOS: nothing to tune)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    return libc


def tune_allocator() -> bool:
    """Apply the allocator setting to this process (mallopt) and export it to children; True when in force.

    A variable already in the environment wins (it was applied by glibc at start; we set the same value)."""
    if os.environ.get(DISABLE_ENV) == "0":
        return False
    for key, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)
    libc = _glibc()
    if libc is None:
        return False
    try:
        mmap_max = int(os.environ["MALLOC_MMAP_MAX_"])
        trim = min(int(os.environ["MALLOC_TRIM_THRESHOLD_"]), _INT_MAX)
    except ValueError:
        mmap_max, trim = 0, _INT_MAX
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1)


def allocator_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` plus the allocator variables it lacks (for a child process started with an explicit environment)."""
    if env.get(DISABLE_ENV) == "0":
        return env
    return {**ALLOCATOR_ENV, **env}


def malloc_probe(size: int = 64 << 20) -> dict[str, bool] | None:
    """Read back from glibc what a large allocation does in this process (None where mallinfo2 is missing).

    `large_block_mmapped`: a `size`-byte malloc became its own mmap (glibc's default; with the setting it comes
    from the heap). `heap_trimmed_on_free`: freeing it gave the heap back to the kernel. The block is never
    touched, so the probe costs no memory."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    before = libc.mallinfo2()
    block = libc.malloc(size)
    if not block:
        return None
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    return {
        "large_block_mmapped": during.hblkhd >= before.hblkhd + size,
        "heap_trimmed_on_free": after.arena + size // 2 < during.arena,
    }


# ------------------------------------------------------------------------------------------------- threads
def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") → CPUs allowed, None when unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100000.0
    return float(parts[0]) / period if period > 0 else None


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The tightest CPU quota on this process's cgroup path (v2 `cpu.max`, else v1 CFS quota), None if none."""
    limits: list[float] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2 unified: check every level up to the root
            current = root / path.lstrip("/")
            while True:
                limit = _read_limit(current / "cpu.max", parse_cpu_max)
                if limit is not None:
                    limits.append(limit)
                if current == root or root not in current.parents:
                    break
                current = current.parent
        elif "cpu" in controllers.split(","):  # v1
            for base in (root / "cpu,cpuacct", root / "cpu"):
                quota = _read_limit(base / path.lstrip("/") / "cpu.cfs_quota_us", float)
                period = _read_limit(base / path.lstrip("/") / "cpu.cfs_period_us", float)
                if quota and quota > 0 and period:
                    limits.append(quota / period)
                    break
    return min(limits) if limits else None


def _read_limit(path: Path, parse: Any) -> float | None:
    try:
        return parse(path.read_text().strip())
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota - 1e-9)))
    return max(1, count)
