"""A local stand-in for API Gateway. Routes come from the template's Api and HttpApi events.

a function run by the Lambda Web Adapter   the request goes to its web app (webapp.py) and the
                                           response comes back as it is produced, chunk by
                                           chunk (API Gateway's response streaming)
any other function                         HTTP request -> payload format 2.0 event -> the
                                           function -> HTTP response
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Invoke = Callable[[str, dict], dict]  # (function, event) -> result
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # "/v1/jobs/{id}"
    function: str
    pattern: re.Pattern

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


def http_routes(template: dict) -> list[Route]:
    routes = []
    for name, res in template["Resources"].items():
        for event in res.get("Properties", {}).get("Events", {}).values():
            if event.get("Type") in ("Api", "HttpApi"):
                p = event["Properties"]
                regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(p["Path"]))
                routes.append(Route(p["Method"].upper(), p["Path"], name, re.compile(f"^{regex}$")))
    return routes


def match(routes: list[Route], method: str, path: str) -> tuple[Route, dict] | None:
    for r in routes:
        m = r.pattern.match(path)
        if m and r.method == method:
            return r, m.groupdict()
    return None


def to_event(route: Route, params: dict, method: str, url: str, headers: dict, body: bytes, source_ip: str) -> dict:
    parts = urlsplit(url)
    now = time.time()
    try:
        text, encoded = body.decode(), False
    except UnicodeDecodeError:
        text, encoded = base64.b64encode(body).decode(), True
    event = {
        "version": "2.0",
        "routeKey": route.key,
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": {k.lower(): v for k, v in headers.items()},
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "local",
            "domainName": headers.get("Host", "localhost"),
            "http": {
                "method": method,
                "path": parts.path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": headers.get("User-Agent", ""),
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": route.key,
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if params:
        event["pathParameters"] = params
    if body:
        event["body"] = text
    if parts.query:
        event["queryStringParameters"] = dict(
            kv.split("=", 1) if "=" in kv else (kv, "") for kv in parts.query.split("&")
        )
    return event


def make_server(
    host: str, port: int, routes: list[Route], invoke: Invoke, web_apps: dict[str, str] | None = None
) -> Gateway:
    """web_apps: function -> base URL of its web app (functions run by the Web Adapter)."""
    web_apps = web_apps or {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: don't wait for a delayed ACK

        def _serve(self) -> None:
            path = urlsplit(self.path).path
            length = (self.headers.get("Content-Length") or "0").strip()
            if not (length.isascii() and length.isdigit()):  # (-1 would read to the end, which never comes)
                self.close_connection = True  # its body cannot be told from the next request
                return self._send(400, {"content-type": "application/json"}, json.dumps({"message": "Bad Request"}))
            body = self.rfile.read(int(length))
            found = match(routes, self.command, path)
            if found is None:
                return self._send(404, {"content-type": "application/json"}, json.dumps({"message": "Not Found"}))
            route, params = found
            if route.function in web_apps:
                return self._forward(web_apps[route.function], body)
            event = to_event(route, params, self.command, self.path, dict(self.headers), body, self.client_address[0])
            try:
                out = invoke(route.function, event)
            except Exception:
                return self._send(
                    500, {"content-type": "application/json"}, json.dumps({"message": "Internal Server Error"})
                )
            raw = out.get("body") or ""
            data = base64.b64decode(raw) if out.get("isBase64Encoded") else raw.encode()
            self._send(out.get("statusCode", 200), out.get("headers") or {}, data)

        def _forward(self, base: str, body: bytes) -> None:
            """The request to the web app; its response back as it arrives (chunked when it streams)."""
            host, _, port = base.removeprefix("http://").partition(":")
            upstream = http.client.HTTPConnection(host, int(port), timeout=900)
            started = False
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP}
                if resp.getheader("content-length") is not None:
                    return self._send(resp.status, out, resp.read())
                started = True
                self.send_response(resp.status)
                for k, v in out.items():
                    self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while data := resp.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client left (or the web app died): closing upstream tells the app
                self.close_connection = True
                if not started:
                    with contextlib.suppress(OSError):
                        self._send(502, {"content-type": "application/json"}, json.dumps({"message": "Bad Gateway"}))
            finally:
                upstream.close()

        def _send(self, status: int, headers: dict, data) -> None:
            data = data.encode() if isinstance(data, str) else data
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in ("content-length", "connection"):
                    self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

        def log_message(self, fmt, *args) -> None:  # access logs stay quiet; the functions log
            pass

    server = Gateway((host, port), Handler)
    server.daemon_threads = True
    return server


class Gateway(ThreadingHTTPServer):
    # socketserver's default accept backlog is 5: twenty clients connecting at once (a load
    # generator, the concurrency tests) overflowed it, and a connection came back reset
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (a load generator closing its pool) is no error of ours."""
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)
