#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver on 127.0.0.1: accepts POST /v1/traces, counts the spans
(decoded with opentelemetry-proto when installed) and prints the count on exit. For measuring the
cost of tracing (`LOCALROUTE_OTLP_ENDPOINT=http://127.0.0.1:4318 localroute bench ...`) without a
collector.

    python scripts/otlp_sink.py [--port 4318]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Sink(BaseHTTPRequestHandler):
    posts = 0
    spans = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).posts += 1
        try:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            req = ExportTraceServiceRequest.FromString(body)
            type(self).spans += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        except ImportError:
            pass
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=4318)
    args = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    print(f"{Sink.posts} exports, {Sink.spans} spans", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
