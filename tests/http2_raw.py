"""A raw HTTP/2 client over a plain socket, for sending what well-behaved clients never send.

An abuser has to break the rules an HTTP/2 library enforces (more streams than the
server allows, resets in a tight loop, header lists past the advertised limit), so
this writes frames itself: a frame is a 9-byte header and a payload (RFC 9113 section
4.1), and header blocks use HPACK literals without Huffman coding (RFC 7541 section
6.2.2), which every decoder must accept. A reader thread drains the server's frames,
counting them by type and keeping the error codes of RST_STREAM and GOAWAY.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
CONTINUATION = 9
MAX_CONCURRENT_STREAMS = 0x3  # a SETTINGS identifier
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x8, 0x7, 0xB


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _int7(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 section 5.1)."""
    if value < 127:
        return bytes([value])
    out, value = bytearray([127]), value - 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + bytes([value]))


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman coding."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _int7(len(name)) + name.encode() + _int7(len(value)) + value.encode()
    return bytes(out)


def grpc_headers(port: int, path: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    return header_block(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or []),
        ]
    )


def grpc_message(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, its length, its bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class RawConnection:
    """One HTTP/2 connection; `send` writes frames, a thread reads and counts replies."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.received: collections.Counter[int] = collections.Counter()
        self.rst_codes: collections.Counter[int] = collections.Counter()
        self.goaway: list[tuple[int, bytes]] = []  # (error code, debug data)
        self.settings: dict[int, int] = {}  # what the server advertised, by identifier
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self._reader.start()
        self.next_stream = 1

    def send(self, data: bytes) -> bool:
        """False once the server has closed the connection (or reset it)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def new_stream(self) -> int:
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        return stream

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    kind, flags = buf[3], buf[4]
                    payload, buf = buf[9 : 9 + length], buf[9 + length :]
                    self.received[kind] += 1
                    if kind == RST_STREAM:
                        self.rst_codes[int.from_bytes(payload[:4], "big")] += 1
                    elif kind == GOAWAY:
                        self.goaway.append((int.from_bytes(payload[4:8], "big"), payload[8:]))
                    elif kind == SETTINGS and not flags & ACK:
                        for i in range(0, len(payload) - 5, 6):
                            key = int.from_bytes(payload[i : i + 2], "big")
                            self.settings[key] = int.from_bytes(payload[i + 2 : i + 6], "big")
                        self.send(frame(SETTINGS, ACK, 0))
        except OSError:
            pass
        finally:
            self.closed.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(10)

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
