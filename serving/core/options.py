"""The options a prediction request may carry besides its images, parsed the same way by both `deepclust serve`
backends (the TorchServe handler and the engine backend's request parser): one rule, one error message.

`top_k`: how many of the best clusters to return per image, 0 (the default: none) to `MAX_TOP_K`. Accepted: an
integer, a string or bytes holding one (a multipart text field, a query parameter), a float with an integral value
(JSON `3.0`). Refused with `ValueError` (the caller answers a request-level `bad_request`): booleans (`true` is not a
count), fractional or non-finite numbers (`2.5`, `1e999`), anything that is not a number, values out of range.
"""

from __future__ import annotations

import math
from typing import Any

OPTION_KEYS = frozenset({"top_k"})  # query parameters / form fields that are options, not images
MAX_TOP_K = 20


def parse_top_k(value: Any) -> int:
    """`value` as sent (None or "" = not asked: 0) → a count in [0, MAX_TOP_K]; `ValueError` otherwise."""
    if value is None or value == "" or value == b"":
        return 0
    if isinstance(value, bytes | bytearray):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"top_k must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"top_k must be an integer, got {value!r}")  # JSON 2.5, 1e999 (inf), NaN
    try:
        top_k = int(value)
    except ValueError as exc:
        raise ValueError(f"top_k must be an integer, got {value!r}") from exc
    if not 0 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 0 and {MAX_TOP_K}")
    return top_k
