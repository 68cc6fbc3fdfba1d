"""The production profile's http listener: every request answered 301 to the real address
(VIP's portal sits behind an http->https redirect)."""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("agent.localvip")

class RedirectHandler(BaseHTTPRequestHandler):
    """Answers every request 301 to the same path on the real address (as VIP's front
    server sends http to https); the body, if any, is not read."""

    protocol_version = "HTTP/1.1"
    server_version = "localvip-redirect"
    sys_version = ""
    server: RedirectServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("localvip redirect %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        body = (
            b"<html><head><title>301 Moved Permanently</title></head><body>"
            b"<center><h1>301 Moved Permanently</h1></center></body></html>"
        )
        self.send_response(301)
        self.send_header("Location", self.server.target + self.path)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET


class RedirectServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], target: str) -> None:
        self.target = target
        super().__init__(addr, RedirectHandler)
