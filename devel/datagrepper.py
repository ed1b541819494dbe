"""A datagrepper stand-in: ``/id?id=`` for ``fedmsg-dg-replay``, ``/raw`` for backlog.

It holds messages in memory: seeded ones (a recorded production compose
message, for the demo) and, optionally, every message seen on a bus (what
datanommer does), so a hub that restarts can replay what it missed through
fedmsg's backlog feature. Clearly a stand-in: no persistence, no auth.

    python -m devel.datagrepper --port 8002 --seed message.json [--record tcp://127.0.0.1:9940]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)


class MessageStore:
    """Messages as datagrepper returns them, in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[dict[str, Any]] = []

    def add(
        self,
        topic: str,
        msg: dict[str, Any],
        msg_id: str | None = None,
        timestamp: float | None = None,
    ) -> str:
        """Store a message; return its msg_id."""
        entry = {
            "topic": topic,
            "msg": msg,
            "msg_id": msg_id or f"{time.strftime('%Y')}-{uuid.uuid4()}",
            "timestamp": float(timestamp if timestamp is not None else time.time()),
            "i": 1,
            "username": "datagrepper",
            "crypto": None,
        }
        with self._lock:
            self._messages.append(entry)
        return str(entry["msg_id"])

    def add_envelope(self, envelope: dict[str, Any]) -> None:
        """Store a fedmsg envelope seen on the bus (keeps its id and timestamp)."""
        self.add(
            envelope["topic"],
            envelope.get("msg", {}),
            envelope.get("msg_id"),
            envelope["timestamp"],
        )

    def by_id(self, msg_id: str) -> dict[str, Any] | None:
        with self._lock:
            return next((m for m in self._messages if m["msg_id"] == msg_id), None)

    def between(
        self, start: float | None, end: float | None, topics: list[str]
    ) -> list[dict[str, Any]]:
        with self._lock:
            return [
                m
                for m in self._messages
                if (start is None or m["timestamp"] >= start)
                and (end is None or m["timestamp"] <= end)
                and (not topics or m["topic"] in topics)
            ]


def _handler(store: MessageStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("datagrepper: " + fmt, *args)

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            path = parts.path.rstrip("/")
            if path.endswith("/id"):
                found = store.by_id(query.get("id", [""])[0])
                if found is None:
                    self._send(404, {"error": "no such message"})
                else:
                    self._send(200, found)
            elif path.endswith("/raw"):
                self._raw(query)
            else:
                self._send(404, {"error": f"unknown path {parts.path}"})

        def _raw(self, query: dict[str, list[str]]) -> None:
            try:
                start = float(query["start"][0]) if "start" in query else None
                end = float(query["end"][0]) if "end" in query else None
                rows = max(1, min(100, int(query.get("rows_per_page", ["25"])[0])))
                page = max(1, int(query.get("page", ["1"])[0]))
            except ValueError as exc:
                self._send(400, {"error": str(exc)})
                return
            found = store.between(start, end, query.get("topic", []))
            if query.get("order", ["desc"])[0] != "asc":
                found.reverse()
            pages = max(1, math.ceil(len(found) / rows))
            chunk = found[(page - 1) * rows : page * rows]
            self._send(
                200,
                {"raw_messages": chunk, "count": len(chunk), "total": len(found), "pages": pages},
            )

    return Handler


class Datagrepper:
    """The HTTP server, in a thread, on a free loopback port by default."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = MessageStore()
        self._server = ThreadingHTTPServer((host, port), _handler(self.store))
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None
        self._recorder: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> Datagrepper:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def record(self, endpoint: str) -> None:
        """Store every message published on the bus behind ``endpoint`` (relay_outbound)."""
        import zmq

        def run() -> None:
            sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(endpoint)
            try:
                while not self._stop.is_set():
                    if not sock.poll(100):
                        continue
                    frames = sock.recv_multipart()
                    try:
                        self.store.add_envelope(json.loads(frames[1]))
                    except (IndexError, ValueError, KeyError, TypeError):
                        log.warning("datagrepper: skipped an unreadable bus message")
            finally:
                sock.close()

        self._recorder = threading.Thread(target=run, name="datagrepper-recorder", daemon=True)
        self._recorder.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for thread in (self._thread, self._recorder):
            if thread is not None:
                thread.join(timeout=5)

    def __enter__(self) -> Datagrepper:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=Path, action="append", default=[], help="message JSON")
    parser.add_argument("--record", help="a relay_outbound endpoint to record")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = Datagrepper(args.host, args.port).start()
    for path in args.seed:
        message = json.loads(path.read_text())
        server.store.add(message["topic"], message["msg"], message.get("msg_id"))
    if args.record:
        server.record(args.record)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"datagrepper stand-in listening on {server.url}", flush=True)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
