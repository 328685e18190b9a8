"""A stand-in for `torch`, put on the TorchServe worker's import path only when torch is NOT installed.

TorchServe 0.12's Python worker imports torch at start (`ts/protocol/otf_message_handler.py`) solely to test
`isinstance(value, torch.Tensor)` when it encodes a handler's response. Our handler returns JSON bytes and runs
onnxruntime, so the serving image needs no torch (several GB): this module gives the worker a `Tensor` class that
nothing is an instance of, and fails loudly on anything else. `serving/hosts/torchserve/server.py` never adds it
when a real torch is importable.
"""

from __future__ import annotations


class Tensor:
    """Nothing is an instance of this class: TorchServe's response encoder then takes its bytes/JSON path."""


def __getattr__(name: str) -> object:
    raise AttributeError(
        f"torch.{name}: torch is not installed; this is deepclust's stand-in for TorchServe's worker import"
    )
