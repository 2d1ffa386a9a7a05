"""An HTTP proxy in front of a moto S3 server that fails requests on demand: the flaky S3 endpoint of
``jobs/runtime/test_run_faults.py``."""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyProxy:
    """HTTP proxy in front of the moto server: answers 503 SlowDown, or resets connections
    (``mode`` "503", "reset" or "mixed": alternating), for the next ``fail`` matching requests, or
    forever with ``fail = -1``. A request matches when its method is in ``methods`` (default
    GET/HEAD: object reads and listings; PUT/POST/DELETE for writes) and its decoded path
    contains ``path_filter``; the first ``pass_first`` matching requests still go through (a
    fault in the middle of a sequence of writes)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.split("//")[1].split(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.fail, self.mode, self.failed = 0, "503", 0
        self.methods: tuple[str, ...] = ("GET", "HEAD")
        self.path_filter, self.pass_first = "", 0
        self.lock = threading.Lock()
        self.server = ProxyServer(self)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fault_for(self, method: str, path: str) -> str | None:
        """Count one request against the fault settings: -> "503" or "reset" where it is to fail, else None."""
        with self.lock:
            match = self.fail != 0 and method in self.methods and self.path_filter in urllib.parse.unquote(path)
            bad = match and self.pass_first <= 0
            if match and self.pass_first > 0:
                self.pass_first -= 1
            if bad:
                self.fail -= 1 if self.fail > 0 else 0
                self.failed += 1
            mode = self.mode if self.mode != "mixed" else ("reset" if self.failed % 2 else "503")
        return mode if bad else None


class ProxyServer(ThreadingHTTPServer):
    """The proxy's HTTP server on a free local port; its handlers read their settings from ``proxy``."""

    def __init__(self, proxy: FlakyProxy) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.proxy = proxy


class ProxyHandler(BaseHTTPRequestHandler):
    """One request: failed as :meth:`FlakyProxy.fault_for` says, else forwarded to the upstream server."""

    protocol_version = "HTTP/1.1"
    server: ProxyServer

    def log_message(self, *a):
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        proxy = self.server.proxy
        fault = proxy.fault_for(self.command, self.path)
        if fault == "reset":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault:
            msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":  # a body after a HEAD answer is read as the next status line
                self.wfile.write(msg)
            return
        c = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        c.request(self.command, self.path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        # HEAD carries the object's size in Content-Length, with no body
        length = r.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
