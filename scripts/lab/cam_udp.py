#!/usr/bin/python3
"""A camera's UDP service for the beckon namespace lab (stdlib only).

Every datagram is answered to its sender (source address and port):
  * `OPTIONS ...` (a SIP OPTIONS request, as a GB28181 camera would get):
        SIP/2.0 200 OK + the request's Via/From/To/Call-ID/CSeq lines
        + `Server: <name>` + `Content-Length: 0`
  * anything else: `<name>: ` + the payload (an empty datagram still gets a
    non-empty answer).
One log line per datagram on stdout: epoch time, sender, length.
SIGTERM/SIGINT: print the datagram count and exit 0.
"""
import argparse
import signal
import socket
import sys
import time

# Header lines copied from a SIP request into the response (full and compact forms).
SIP_COPY = {"via", "from", "to", "call-id", "cseq", "v", "f", "t", "i"}


def sip_options_reply(data: bytes, name: str) -> bytes:
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    lines = [ln.rstrip(b"\r") for ln in head.split(b"\n")[1:]]
    copied = []
    for ln in lines:
        key = ln.split(b":", 1)[0].strip().lower()
        if b":" in ln and key.decode(errors="replace") in SIP_COPY:
            copied.append(ln + b"\r\n")
    return (b"SIP/2.0 200 OK\r\n" + b"".join(copied)
            + b"Server: " + name.encode() + b"\r\nContent-Length: 0\r\n\r\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=5060)
    ap.add_argument("--name", default="cam")
    a = ap.parse_args()

    count = 0

    def stop(signum, _frame):
        print(f"{time.time():.6f} {a.name} stop (signal {signum}) after {count} datagrams", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # One process stands in for up to 10,000 cameras (the bench's UDP phase): give its socket
    # the room 10,000 sockets would have, so that what gets lost in a burst is lost on the path,
    # not here (as root: SO_RCVBUFFORCE ignores net.core.rmem_max).
    try:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 16 << 20)
    except OSError:
        pass
    s.bind((a.bind, a.port))
    print(f"{time.time():.6f} {a.name} udp listening on {a.bind}:{a.port}", flush=True)
    while True:
        data, peer = s.recvfrom(65535)
        count += 1
        if data.startswith(b"OPTIONS "):
            reply, kind = sip_options_reply(data, a.name), "sip-options"
        else:
            reply, kind = a.name.encode() + b": " + data, "echo"
        try:
            s.sendto(reply, peer)
            sent = "ok"
        except OSError as e:
            sent = f"send-error {e.errno}"
        print(f"{time.time():.6f} {a.name} rx from {peer[0]}:{peer[1]} len {len(data)} {kind} {sent}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
