"""Serving: no torch, never `training`. `core/` is what every host shares (the model contract, the model-store
resolver, pre-processing, the engine, metrics); `hosts/` are the programs built on it (docs/design.md §1)."""
