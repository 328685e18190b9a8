"""The torch stand-in lets TorchServe's worker modules import in a serve-only install (no torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import serving.hosts.torchserve

SHIM = Path(serving.hosts.torchserve.__file__).resolve().parent / "ts_shim"


def test_torchserve_worker_imports_with_the_stand_in_and_it_fails_loudly_elsewhere() -> None:
    code = (
        "import torch, ts.model_service_worker, ts.protocol.otf_message_handler as h\n"
        f"assert torch.__file__.startswith({str(SHIM)!r}), torch.__file__\n"
        "assert not isinstance(b'x', torch.Tensor)\n"
        "try:\n    torch.zeros\nexcept AttributeError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SHIM)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: torch.zeros" in out.stdout


def test_server_adds_the_stand_in_only_without_a_real_torch(tiny_model_dir, tmp_path) -> None:
    from serving.hosts.torchserve.server import ServeConfig, TorchServeHost

    host = TorchServeHost(ServeConfig(model=str(tiny_model_dir), cache_dir=tmp_path))
    # this venv has the train extra (a real torch): the worker must import the real one
    assert str(SHIM) not in host.environment().get("PYTHONPATH", "")
