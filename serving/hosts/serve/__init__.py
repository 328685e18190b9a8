"""What both `deepclust serve` backends share: the settings (`config`), the HTTP front on aiohttp (`front`), the
Open Inference Protocol endpoints (`v2`) and the Prometheus metrics (`telemetry`)."""
