"""Built-in methods register themselves on import."""

from training.methods import cc  # noqa: F401
