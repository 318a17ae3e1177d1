"""An OTLP/gRPC trace receiver that counts what it is sent and keeps nothing.

bench/otlp/run.sh runs it as the collector the shop exports to, so that the cost measured is the
shop's (building, batching, encoding and sending spans), not a collector's. On SIGTERM or SIGINT
it prints one line: export requests, spans and bytes received.

Usage: python sink.py [PORT]   (default 4317; needs grpcio and opentelemetry-proto)
"""

import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Counting(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.spans = 0
        self.bytes = 0

    def Export(self, request, context):
        spans = sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        with self.lock:
            self.requests += 1
            self.spans += spans
            self.bytes += request.ByteSize()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4317
    counting = Counting()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counting, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"otlp sink listening on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1)
    with counting.lock:
        print(
            f"otlp sink: {counting.requests} export requests, {counting.spans} spans, "
            f"{counting.bytes} bytes",
            flush=True,
        )


if __name__ == "__main__":
    main()
