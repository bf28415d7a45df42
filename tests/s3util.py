"""Real S3 on loopback for tests: a moto server, plus a fault-injecting HTTP proxy in front of it."""
from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_ERROR = """<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault</RequestId></Error>"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's ThreadedMotoServer on a free 127.0.0.1 port."""

    def __init__(self):
        from moto.server import ThreadedMotoServer
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.server.start()
        return self

    def stop(self):
        self.server.stop()

    def reset(self):
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")).read()


class FaultProxy:
    """HTTP proxy on 127.0.0.1 that forwards to an upstream S3 server and injects faults.

    `policy(method, path, n) -> action` decides per request (n counts requests):
    None (forward), ("status", code, s3_code), "reset" (drop the connection), "truncate" (cut the body; a HEAD,
    which has none, is dropped). Forwarded HEAD answers keep the upstream's headers, Content-Length included.
    """

    def __init__(self, upstream_port: int, policy=None):
        self.upstream_port = upstream_port
        self.policy = policy or (lambda method, path, n: None)
        self.count = 0
        self.injected: list[tuple] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                action = proxy.policy(self.command, self.path, n)
                if action is not None:
                    proxy.injected.append((self.command, self.path, action))
                head = self.command == "HEAD"
                if action == "reset" or (action == "truncate" and head):  # a HEAD has no body to cut: drop it
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if isinstance(action, tuple) and action[0] == "status":
                    payload = S3_ERROR.format(code=action[2], message="injected fault").encode()
                    self.send_response(action[1])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload if not head else b"")
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()  # b"" for a HEAD
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    # a HEAD answer keeps the upstream's Content-Length: clients (pyarrow) size objects by it
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    conn.close()
                    return
                if action == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def random_faults(seed: int, rate: float, actions=(("status", 503, "SlowDown"), ("status", 500, "InternalError"), "reset", "truncate")):
    """A seeded policy injecting a random fault into `rate` of the requests."""
    rng = random.Random(seed)
    return lambda method, path, n: rng.choice(actions) if rng.random() < rate else None
