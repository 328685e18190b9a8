"""Built-in methods register themselves on import."""

from training.methods import (
    cc,  # noqa: F401
    cces,  # noqa: F401
    scan,  # noqa: F401
    turtle,  # noqa: F401
)
