"""`deepclust serve`: TorchServe behind our HTTP front, with our handler and Prometheus metrics (docs/design.md §3)."""
