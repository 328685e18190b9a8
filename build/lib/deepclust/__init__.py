"""deepclust: deep image clustering from training to production."""

__version__ = "0.1.0"
