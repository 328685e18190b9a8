"""Import-path stand-ins for TorchServe's worker (see `torch/__init__.py`); not imported by deepclust itself."""
