"""The metrics port: `/metrics` for Prometheus, `/livez` and `/readyz` for probes.

Under `twolane serve` every child process writes its metrics to Prometheus'
multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor for its children);
this server, in the supervisor, merges them into one scrape. Any other path is 404.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector


class MetricsServer:
    """Serves on `host:port` (0 picks a free port) from a thread of its own.

    Args:
        registry: what `/metrics` shows.
        is_ready: whether `/readyz` answers 200 (else 503); `/livez` is 200 while the
            process answers at all.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, is_ready: Callable[[], bool]
    ) -> None:
        handler = _handler(registry, is_ready)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="twolane-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def multiprocess_registry(metrics_dir: str) -> CollectorRegistry:
    """A registry that reads every child's metric files in `metrics_dir`."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return registry


def _handler(
    registry: CollectorRegistry, is_ready: Callable[[], bool]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/livez":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ready = is_ready()
                self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the log

    return Handler
