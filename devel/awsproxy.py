"""An HTTP proxy in front of moto_server: what the processes of a stack send to AWS, and delay.

``RecordingProxy`` forwards every request to an upstream and keeps both sides
of each exchange in order (the IAM policy test reads them); with ``delay`` it
holds each request that long first, standing in for the round trip to a real
AWS endpoint (the scale-out benchmark). Give ``StackOptions(aws_proxy=proxy.attach)``.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)


@dataclass(frozen=True)
class Exchange:
    start: int  # order of arrival
    end: int  # order of completion
    method: str
    target: str  # path and query
    headers: Mapping[str, str]
    body: bytes
    status: int
    response: bytes


class RecordingProxy:
    """Forwards every HTTP request to an upstream and keeps both sides, in order.

    Its own URL exists at once; the upstream (moto_server) is attached when the
    stack has started it, before any process that uses the proxy is spawned.
    ``delay`` seconds are spent before each request is forwarded (the round
    trip to a real AWS endpoint); ``keep=False`` only counts the exchanges.
    """

    def __init__(self, delay: float = 0.0, keep: bool = True) -> None:
        self.delay = delay
        self.keep = keep
        self.count = 0
        self._upstream: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._in_flight = 0
        self.exchanges: list[Exchange] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                start = proxy.tick(+1)
                if proxy.delay:
                    time.sleep(proxy.delay)
                try:
                    status, answer_headers, data = self.upstream(body)
                    # Recorded once moto answered (its effects exist from then on), even if
                    # the caller is gone by the time the answer is written back.
                    proxy.add(
                        Exchange(
                            start,
                            proxy.tick(),
                            self.command,
                            self.path,
                            dict(self.headers.items()),
                            body,
                            status,
                            data,
                        )
                    )
                finally:
                    proxy.tick(-1)
                self.send_response(status)
                for key, value in answer_headers:
                    if key.lower() not in _HOP_BY_HOP | {"content-length", "server", "date"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def upstream(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                assert proxy._upstream is not None, "no upstream attached"
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=120)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    return answer.status, answer.getheaders(), answer.read()
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = forward

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def attach(self, upstream: str) -> str:
        """Forward to ``upstream`` from now on; returns the URL to use instead of it."""
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self._upstream = (parts.hostname, parts.port)
        return self.url

    def tick(self, delta: int = 0) -> int:
        """The next sequence number; ``delta`` counts a request in (+1) or out (-1)."""
        with self._lock:
            self._in_flight += delta
            return next(self._counter)

    def add(self, exchange: Exchange) -> None:
        with self._lock:
            self.count += 1
            if self.keep:
                self.exchanges.append(exchange)

    def idle(self) -> bool:
        with self._lock:
            return self._in_flight == 0

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def snapshot(self) -> list[Exchange]:
        with self._lock:
            return list(self.exchanges)
