"""A tiny Pushgateway stand-in for tests: a real HTTP server on 127.0.0.1 that records requests."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Gateway:
    url: str
    status: int = 200
    requests: list[tuple[str, str, str]] = field(default_factory=list)   # (method, path, body)
    headers: list[dict[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def pushgateway(status: int = 200) -> Iterator[Gateway]:
    gw = Gateway(url="", status=status)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            n = int(self.headers.get("Content-Length", 0))
            gw.requests.append((self.command, self.path, self.rfile.read(n).decode("utf-8")))
            gw.headers.append(dict(self.headers))
            self.send_response(gw.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = _record

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    gw.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield gw
    finally:
        server.shutdown()
        server.server_close()
