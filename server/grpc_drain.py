"""Graceful stop of the gRPC listener that delivers large responses in full.

grpc-core closes a draining HTTP/2 connection (shutdown(2), then close) as soon as its
last stream's trailers are handed to the kernel. A client still reading a large response
keeps sending WINDOW_UPDATE and PING frames; the first to arrive after the shutdown makes
the server's kernel answer with a TCP reset and drop what it had not sent yet, so the
client gets UNAVAILABLE for a request the server completed. grpc offers no lingering
close, so the edge waits before asking grpc to stop: until no call is in flight and the
kernel has sent, and the client acknowledged, every byte of every gRPC connection
(TIOCOUTQ), holding duplicates of the connections' descriptors to ask. Meanwhile new
inference calls answer UNAVAILABLE (`GrpcApi.draining`), as Triton's do when it stops.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
import time

from fleetserve.server.grpc_api import GrpcApi

POLL_S = 0.05
QUIET_POLLS = 3  # consecutive polls with nothing in flight or unsent: delivered


def connections(port: int) -> list[socket.socket]:
    """Duplicates of this process's TCP connections accepted on `port`."""
    found, made = [], set()  # our duplicates may take numbers the listing holds
    for name in os.listdir("/dev/fd"):
        if int(name) in made:
            continue
        try:
            fd = os.dup(int(name))
        except OSError:  # closed since the listing
            continue
        made.add(fd)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        try:
            accepted = (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockname()[1] == port
                and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            )
        except OSError:
            accepted = False
        if accepted:
            found.append(sock)
        else:
            sock.close()
    return found


def unsent(sock: socket.socket) -> int:
    """Bytes the kernel holds for the peer: not sent yet, or not acknowledged."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except OSError:  # the connection is gone: nothing left to deliver
        return 0
    return int(struct.unpack("i", raw)[0])


async def drain(api: GrpcApi, port: int, deadline: float) -> None:
    """Refuse new inference, then wait (until `deadline`, monotonic) for the calls in
    flight to finish and every gRPC connection's bytes to reach its client."""
    api.draining = True
    held = connections(port)
    try:
        quiet = 0
        while quiet < QUIET_POLLS and time.monotonic() < deadline:
            busy = api.in_flight > 0 or any(unsent(sock) for sock in held)
            quiet = 0 if busy else quiet + 1
            await asyncio.sleep(POLL_S)
    finally:
        for sock in held:
            sock.close()
