"""The answer for one image, shared by every host: a cluster assignment or a per-image error (docs/design.md §3).

Why pydantic here: the HTTP response and the labeller rows are external contracts; validating them at the edge turns a
silent schema drift into a loud error. The model's own contract (ONNX names, metadata, card) is `serving.core.contract`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

ERROR_CODES = ("decode_error", "too_large", "unsupported_format", "empty", "bad_request")
ErrorCode = Literal["decode_error", "too_large", "unsupported_format", "empty", "bad_request"]


class TopK(BaseModel):
    """One of the best clusters for an image (only when top-k was asked for)."""

    cluster: int
    probability: float
    label: str | None = None


class Assignment(BaseModel):
    """The answer for one good image: its cluster, the max probability, the class name if any."""

    cluster: int
    confidence: float
    label: str | None = None
    top_k: list[TopK] | None = None

    def public(self) -> dict[str, Any]:
        """The JSON object sent to clients: `top_k` only when it was asked for."""
        return self.model_dump(exclude_none=False, exclude={"top_k"} if self.top_k is None else set())


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str


class ItemError(BaseModel):
    """The answer for one bad image: it never fails the other images of the request."""

    error: ErrorDetail

    @classmethod
    def of(cls, code: str, message: str) -> ItemError:
        return cls(error=ErrorDetail(code=code, message=message))  # type: ignore[arg-type]


ItemResult = Assignment | ItemError
