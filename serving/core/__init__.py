"""The torch-free core every host and training's evaluation share: contract, model store, pre-processing, engine,
per-image results, quality metrics, drift statistics, and the engine over many files (docs/design.md §1, §7)."""
