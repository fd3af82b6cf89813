#!/usr/bin/python3
"""A camera's RTSP server for the beckon namespace lab (GStreamer RTSP server, H.264).

Serves rtsp://BIND:PORT/stream (path configurable): a live test picture (moving ball,
the camera's name written on it) encoded by x264 (640x360, 25 fps, 2 Mbit/s, a key frame
every second, SPS/PPS with every key frame) and packetised as RTP/H.264 (pt 96).
The media is shared: all clients watch the same encoder, which runs only while at least
one client is playing. Transports: RTP over UDP and interleaved in the RTSP TCP connection
(`ffmpeg -rtsp_transport tcp`).

One log line on stdout when listening and one per client connect / disconnect (epoch
time first). SIGTERM/SIGINT: exit 0. Exit 1 when the address cannot be bound or a
GStreamer element is missing (`--check` only tests the latter).

Needs Debian's python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-base (+good)
and gstreamer1.0-plugins-ugly (x264enc); they load only in /usr/bin/python3.
"""
import argparse
import re
import signal
import sys
import time

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer
except (ImportError, ValueError) as e:  # ValueError: typelib not installed
    print(f"cam_rtsp: GStreamer RTSP server bindings missing ({e}); install python3-gi "
          "gir1.2-gst-rtsp-server-1.0 and run with /usr/bin/python3", file=sys.stderr, flush=True)
    sys.exit(1)

ELEMENTS = ("videotestsrc", "capsfilter", "textoverlay", "x264enc", "rtph264pay")


def log(msg: str) -> None:
    print(f"{time.time():.6f} {msg}", flush=True)


def launch_line(a) -> str:
    text = a.name.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f"( videotestsrc is-live=true pattern={a.pattern}"
        f" ! video/x-raw,width={a.width},height={a.height},framerate={a.fps}/1"
        f' ! textoverlay text="{text}" valignment=top halignment=left font-desc="Sans 24"'
        f" ! x264enc tune=zerolatency speed-preset=ultrafast bitrate={a.bitrate}"
        f" key-int-max={a.fps}"
        " ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def missing_elements() -> list:
    return [e for e in ELEMENTS if Gst.ElementFactory.find(e) is None]


def peer_of(client) -> str:
    try:
        conn = client.get_connection()
        addr = conn.get_read_socket().get_remote_address()
        return f"{addr.get_address().to_string()}:{addr.get_port()}"
    except Exception:  # noqa: BLE001 - logging only
        try:
            return client.get_connection().get_ip() or "?"
        except Exception:  # noqa: BLE001
            return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    ap.add_argument("--port", type=int, default=554, help="RTSP TCP port (default 554)")
    ap.add_argument("--name", default="cam", help="camera name, written on the picture")
    ap.add_argument("--path", default="/stream", help="mount point (default /stream)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--bitrate", type=int, default=2000,
                    help="x264 target kbit/s (default 2000; a simple picture stays far below)")
    ap.add_argument("--pattern", default="ball",
                    help="videotestsrc pattern (default ball, ~0.2 Mbit/s; snow fills the bitrate)")
    ap.add_argument("--check", action="store_true",
                    help="only check that the GStreamer elements exist, then exit")
    a = ap.parse_args()
    if not a.path.startswith("/") or not re.fullmatch(r"/[A-Za-z0-9_./-]*", a.path):
        ap.error("--path must start with / and contain only letters, digits, _ . / -")
    if not re.fullmatch(r"[a-z0-9-]+", a.pattern):
        ap.error("--pattern wants a videotestsrc pattern name, e.g. ball, smpte, snow")
    if min(a.width, a.height, a.fps, a.bitrate) <= 0 or not 0 < a.port < 65536:
        ap.error("sizes, fps, bitrate and port must be positive")

    Gst.init(None)
    miss = missing_elements()
    if miss:
        print(f"cam_rtsp: missing GStreamer elements: {' '.join(miss)} (x264enc is in "
              "gstreamer1.0-plugins-ugly, textoverlay in gstreamer1.0-plugins-base)",
              file=sys.stderr, flush=True)
        return 1
    if a.check:
        print(f"cam_rtsp: ok ({Gst.version_string()})", flush=True)
        return 0

    server = GstRtspServer.RTSPServer()
    server.set_address(a.bind)
    server.set_service(str(a.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(a))
    factory.set_shared(True)
    # default protocols: UDP, UDP multicast and TCP (interleaved)
    server.get_mount_points().add_factory(a.path, factory)

    stats = {"clients": 0}

    def on_client(_server, client):
        stats["clients"] += 1
        peer = peer_of(client)
        log(f"{a.name} rtsp client {stats['clients']} connected from {peer}")
        client.connect("closed", lambda _c: log(f"{a.name} rtsp client from {peer} closed"))

    server.connect("client-connected", on_client)

    loop = GLib.MainLoop()
    try:
        attached = server.attach(None) != 0
        why = "address in use or not local?"
    except GLib.Error as e:
        attached, why = False, str(e)
    if not attached:
        print(f"cam_rtsp: cannot listen on {a.bind}:{a.port} ({why})", file=sys.stderr, flush=True)
        return 1

    def stop(signum):
        log(f"{a.name} stop (signal {signum}), {stats['clients']} clients served")
        loop.quit()
        return GLib.SOURCE_REMOVE

    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, stop, sig)

    # expire sessions of UDP clients that vanished without TEARDOWN
    def cleanup():
        server.get_session_pool().cleanup()
        return GLib.SOURCE_CONTINUE

    GLib.timeout_add_seconds(2, cleanup)

    log(f"{a.name} rtsp listening on rtsp://{a.bind}:{server.get_bound_port()}{a.path}")
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
