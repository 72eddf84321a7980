"""A scripted HTTP server on 127.0.0.1 for fetch tests: each path answers from a list of responses in
order (the last one repeats), and every request is recorded. Stalls end when the server stops."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    stall: float = 0.0  # seconds to wait before answering
    short: bool = False  # promise more bytes than are sent, then close the connection


class Server:
    def __init__(self, routes: dict[str, list[Answer]]):
        self.routes = routes
        self.requests: list[str] = []
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the name http.server calls
                server.requests.append(self.path)
                answers = server.routes.get(self.path, [Answer(404)])
                answer = answers[min(server.requests.count(self.path), len(answers)) - 1]
                if answer.stall and server._stop.wait(answer.stall):
                    return
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(answer.body) + (100 if answer.short else 0)))
                self.end_headers()
                self.wfile.write(answer.body)
                if answer.short:
                    self.close_connection = True

            def log_message(self, *args):  # keep the test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def count(self, path: str) -> int:
        return self.requests.count(path)


@contextmanager
def http_server(routes: dict[str, list[Answer]]):
    """A started ``Server``; stopped (stalled answers released, socket closed) when the block ends."""
    server = Server(routes)
    thread = threading.Thread(target=server._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server._stop.set()
        server._httpd.shutdown()
        server._httpd.server_close()
        thread.join(5)
