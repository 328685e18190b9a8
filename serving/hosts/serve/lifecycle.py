"""What every serving backend's host does the same way: be a context manager that never leaks a half-started server,
and run in the foreground until Ctrl-C/SIGTERM (`deepclust serve`), saying where everything is.

Why one module: the TorchServe host and the engine host differ in what they start and what they wait on, not in how a
failed start is cleaned up, how signals stop them or how token authorization is announced; written twice, those
drift apart.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from serving.hosts.serve.config import ServeConfig, _url_host


class ManagedHost:
    """`with Host(config) as host:` starts the backend and waits until it answers; a start that fails half-way is
    stopped before the error propagates, and leaving the block stops everything."""

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - the subclass
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def common_ready_lines(config: ServeConfig, key_file: object) -> tuple[list[str], list[str]]:
    """(lines before, lines after) the backend's own lines of the ready banner: the URLs every backend serves, and
    how to authenticate."""
    url = f"{config.base_url}/predictions/{config.model_name}"
    head = [
        f"  try: curl --data-binary @cat.jpg {url}",
        f"  Open Inference Protocol: {config.base_url}/v2/models/{config.model_name}/infer",
        f"  deepclust metrics: http://{_url_host(config.metrics_host)}:{config.metrics_port}/metrics",
    ]
    if config.auth_enabled:
        tail = [
            f"  token authorization ON: key file {key_file} (0600)",
            "  send 'Authorization: Bearer <inference key>' (deepclust predict --key-file …)",
        ]
    else:
        tail = ["  token authorization off (every API is bound to loopback)"]
    return head, tail


def run_in_foreground(
    host: ManagedHost,
    *,
    starting: str,
    ready: Callable[[], list[str]],
    wait: Callable[[], int],
    stopping: str,
    echo: Callable[[str], object] = print,
) -> int:
    """Start `host`, print `ready()`, block in `wait()` (its return value is the exit code) until Ctrl-C/SIGTERM,
    then stop the host; the previous signal handlers are restored."""

    def _on_signal(signum, _frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        echo(starting)
        host.start()
        host.wait_ready()
        for line in ready():
            echo(line)
        return wait()
    except KeyboardInterrupt:
        echo(stopping)
        return 0
    finally:
        host.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
