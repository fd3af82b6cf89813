#!/usr/bin/python3
"""A camera's paced stream for the beckon benchmark (stdlib only): every TCP connection
accepted on --bind:--port gets a continuous byte stream at --rate bytes/s (a camera's video
bitrate), written in slices every --tick seconds (connections are spread over the tick).
Like a camera encoder, it never waits for the network: when more than one second of data is
still queued for a connection, the next slice is dropped (counted). Reads and discards what
the client sends; stops a stream at the client's EOF. One log line per closed connection.
SIGTERM/SIGINT: exit 0."""
import argparse
import asyncio
import signal
import socket
import sys
import time


class Stream(asyncio.Protocol):
    def __init__(self, app):
        self.app, self.sent, self.dropped, self.t = app, 0, 0, None

    def connection_made(self, transport):
        self.t = transport
        self.peer = transport.get_extra_info("peername")
        self.app.conns.add(self)

    def data_received(self, data):
        pass

    def eof_received(self):
        return False  # close

    def connection_lost(self, exc):
        self.app.conns.discard(self)
        self.app.closed += 1
        print(f"{time.time():.3f} closed {self.peer} sent {self.sent} dropped_slices {self.dropped}",
              flush=True)


class App:
    def __init__(self, rate, tick, slots):
        self.conns = set()
        self.closed = 0
        self.slice = int(rate * tick)
        self.limit = int(rate)  # one second queued
        self.payload = (bytes(range(256)) * (self.slice // 256 + 1))[: self.slice]
        self.tick, self.slots = tick, slots

    async def pace(self):
        loop = asyncio.get_running_loop()
        step = self.tick / self.slots
        t = loop.time()
        k = 0
        while True:
            slot = k % self.slots
            for c in list(self.conns):
                if id(c) % self.slots != slot or c.t.is_closing():
                    continue
                if c.t.get_write_buffer_size() > self.limit:
                    c.dropped += 1
                else:
                    c.t.write(self.payload)
                    c.sent += self.slice
            k += 1
            t += step
            delay = t - loop.time()
            if delay < -1.0:  # far behind (overloaded host): resynchronise, never burst
                t = loop.time()
                delay = 0
            await asyncio.sleep(max(delay, 0))


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--rate", type=float, default=500_000, help="bytes per second per stream")
    ap.add_argument("--tick", type=float, default=0.1)
    ap.add_argument("--cc", default="cubic", help="TCP congestion control of the streams (as scripts/lab/cam_http.py)")
    a = ap.parse_args()
    app = App(a.rate, a.tick, 10)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    srv = await loop.create_server(lambda: Stream(app), a.bind, a.port, backlog=4096, reuse_address=True)
    try:
        for s in srv.sockets:  # accepted connections inherit it
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, a.cc.encode())
    except OSError as e:
        sys.exit(f"paced_cam: cannot send with congestion control {a.cc!r} ({e}); available: "
                 + open("/proc/sys/net/ipv4/tcp_available_congestion_control").read().strip())
    print(f"{time.time():.3f} paced stream listening on {a.bind}:{a.port} rate {a.rate:.0f} B/s", flush=True)
    pacer = asyncio.create_task(app.pace())
    await stop.wait()
    pacer.cancel()
    srv.close()
    print(f"{time.time():.3f} stop: {len(app.conns)} open, {app.closed} closed", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
