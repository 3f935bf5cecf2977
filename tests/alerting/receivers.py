"""Local stand-ins for Slack's incoming webhook and PagerDuty's Events API v2: real HTTP
servers (in a thread) that record every JSON request they get, like the real services would."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder:
    """An HTTP server answering every POST with ``status`` and keeping (time, path, body)."""

    def __init__(self, status: int = 200, reply: dict | None = None):
        self.requests: list[tuple[float, str, dict]] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                with recorder._lock:
                    recorder.requests.append((time.monotonic(), self.path, body))
                payload = json.dumps(reply or {"status": "success", "message": "Event processed"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict]:
        with self._lock:
            return [b for _t, _p, b in self.requests]

    def timed(self) -> list[tuple[float, dict]]:
        with self._lock:
            return [(t, b) for t, _p, b in self.requests]
