"""Counting WebSocket frames without decoding them, for the benchmarks' clients."""

from __future__ import annotations

import struct


def complete_frames(buffer: bytearray) -> tuple[list[tuple[int, int, int]], int]:
    """The complete server frames at the start of ``buffer``, and the bytes they take.

    Each is ``(first byte, payload offset, payload length)``. Only the length
    fields of the header are read, which is all a counting client needs; the
    clients here must cost far less per message than the servers they
    measure, and a full WebSocket parser (wsproto: about 6 µs a message)
    would make them the bottleneck. The service itself never does this.
    """
    frames = []
    offset, end = 0, len(buffer)
    while end - offset >= 2:
        head, length = buffer[offset], buffer[offset + 1] & 0x7F
        start = offset + 2
        if length == 126:
            if end - offset < 4:
                break
            (length,) = struct.unpack_from("!H", buffer, offset + 2)
            start = offset + 4
        elif length == 127:
            if end - offset < 10:
                break
            (length,) = struct.unpack_from("!Q", buffer, offset + 2)
            start = offset + 10
        if end - start < length:
            break
        frames.append((head, start, length))
        offset = start + length
    return frames, offset
