"""moto with DynamoDB's one promise kept: each request is atomic.

Stratus leans on conditional writes (a worker's touch is RUNNING -> RUNNING if ours; its result is
RUNNING -> DONE if ours). DynamoDB applies each one atomically. moto checks the condition, then
applies the update, with nothing between them held: two threads can both pass their checks and
the later write wins, so a touch could turn a DONE job back into RUNNING and a client would wait
for a result that was written. Local mode (moto server answers many clients at once) and the tests
(in-process moto under threaded workers) therefore handle one DynamoDB request at a time.

SQS and S3 stay concurrent: a long-polling ReceiveMessage waits inside moto, and every consumer of
a queue already copes with a message delivered twice.

Connections are kept alive (HTTP/1.1, as AWS endpoints keep them): werkzeug's server speaks
HTTP/1.0 by default, so each boto3 call paid a new TCP connection and a new server thread
(a DynamoDB GetItem 3.9 -> 2.5 ms from boto3 [Zen 4]). Each request's backend is found once per
host (route_once), and no request writes an access-log line: GetItem 4.7-5.3 -> 4.1-4.3 ms, PutItem
4.2-4.9 -> 3.7-3.9 ms from boto3 against a table of 300 items [Zen 4].

    python -m stratus_local.moto_server -H 127.0.0.1 -p PORT    moto.server's own arguments
"""

from __future__ import annotations

import functools
import sys
import threading

_LOCK = threading.Lock()


def serialize_dynamodb() -> None:
    """Make every DynamoDB request moto handles in this process atomic (idempotent)."""
    from moto.dynamodb.responses import DynamoHandler

    call = DynamoHandler.call_action
    if getattr(call, "serialized", False):
        return

    @functools.wraps(call)
    def one_at_a_time(self, *args, **kwargs):
        with _LOCK:
            return call(self, *args, **kwargs)

    one_at_a_time.serialized = True
    DynamoHandler.call_action = one_at_a_time


def route_once() -> None:
    """Find each host's backend once, not on every request: moto's server lists its own package
    directory (an isdir per service) and tries hundreds of URL patterns for each request it
    routes, under one lock that every request passes."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    find = DomainDispatcherApplication.get_backend_for_host
    if getattr(find, "remembered", False):
        return
    found: dict = {}

    @functools.wraps(find)
    def remembered(self, host):  # (called under the application's lock)
        if host not in found:
            found[host] = find(self, host)
        return found[host]

    remembered.remembered = True
    DomainDispatcherApplication.get_backend_for_host = remembered


def main(argv: list[str]) -> None:
    from moto.server import main as moto_main
    from werkzeug.serving import WSGIRequestHandler

    serialize_dynamodb()
    route_once()
    WSGIRequestHandler.protocol_version = "HTTP/1.1"  # keep-alive (werkzeug sets Content-Length or chunks)
    WSGIRequestHandler.log_request = lambda *args, **kwargs: None  # no line per request (errors still log)
    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
