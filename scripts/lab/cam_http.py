#!/usr/bin/python3
"""A camera's web page for the beckon namespace lab (stdlib only).

GET /                -> 200 text/html, body contains `<h1>camera <name></h1>`
GET /bulk?bytes=N    -> 200 application/octet-stream, exactly N bytes (N <= 1 GiB),
                        streamed in 64 KiB chunks (throughput tests)
GET /reset           -> the start of a response, then the connection is reset (RST, no FIN):
                        a camera that aborts (reset propagation tests)
Every response closes the connection (HTTP/1.0 style). One log line per request
on stdout (epoch time, peer, request line, status). SIGTERM/SIGINT: exit 0.
--cc NAME: the TCP congestion control the camera sends with (default cubic: Linux's default,
what camera firmware runs; a lab host's own default may be another, e.g. bbr, which paces a
sender to its own estimate of the path and changes every throughput figure).
"""
import argparse
import signal
import socket
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_BULK = 1 << 30
# byte p of a /bulk body is (p % 65536) % 251: a tester can check every byte's place (a prime
# period: bytes shifted by any amount below 64 KiB that is not a multiple of 251 show)
CHUNK = bytes(i % 251 for i in range(65536))  # 64 KiB


def make_handler(name: str):
    class Handler(BaseHTTPRequestHandler):
        server_version = f"beckon-lab-{name}"
        sys_version = ""

        def _send(self, code: int, ctype: str, body: bytes, head_only=False):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def _route(self, head_only: bool):
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                peer = f"{self.client_address[0]}:{self.client_address[1]}"
                body = (f"<!doctype html>\n<html><head><title>camera {name}</title></head>\n"
                        f"<body><h1>camera {name}</h1>\n<p>you are {peer}</p></body></html>\n").encode()
                self._send(200, "text/html; charset=utf-8", body, head_only)
            elif url.path == "/bulk":
                try:
                    n = int(parse_qs(url.query).get("bytes", ["0"])[0])
                    if n < 0:
                        raise ValueError
                except ValueError:
                    self._send(400, "text/plain", b"bytes=N with 0 <= N expected\n", head_only)
                    return
                n = min(n, MAX_BULK)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(n))
                self.send_header("Connection", "close")
                self.end_headers()
                if head_only:
                    return
                left = n
                try:
                    while left > 0:
                        k = min(left, len(CHUNK))
                        self.wfile.write(CHUNK[:k] if k < len(CHUNK) else CHUNK)
                        left -= k
                except (ConnectionError, TimeoutError):
                    pass
            elif url.path == "/reset":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
                # Linger 0: close() sends RST instead of FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self._send(404, "text/plain", b"not found\n", head_only)

        def do_GET(self):
            self._route(False)

        def do_HEAD(self):
            self._route(True)

        def log_message(self, fmt, *args):
            print(f"{time.time():.6f} {name} http from {self.client_address[0]}:{self.client_address[1]} "
                  f"{fmt % args}", flush=True)

    return Handler


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--name", default="cam")
    ap.add_argument("--cc", default="cubic", help="TCP congestion control of the camera's connections")
    a = ap.parse_args()

    def stop(signum, _frame):
        print(f"{time.time():.6f} {a.name} stop (signal {signum})", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer((a.bind, a.port), make_handler(a.name))
    # set on the listening socket: accepted connections inherit it
    try:
        srv.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, a.cc.encode())
    except OSError as e:
        sys.exit(f"cam_http: cannot send with congestion control {a.cc!r} ({e}); available: "
                 + open("/proc/sys/net/ipv4/tcp_available_congestion_control").read().strip())
    print(f"{time.time():.6f} {a.name} http listening on {a.bind}:{a.port}", flush=True)
    srv.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
