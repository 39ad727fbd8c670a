"""Newline-delimited JSON stream splitting (sans-IO).

The gateway answers streaming RPCs (watch, lease keep-alive) with one JSON object per
message, separated by ``\\n``.  TCP delivers arbitrary pieces: a message may be split
across reads, or many may arrive in one.  :class:`LineSplitter` buffers the partial tail.
"""

from __future__ import annotations

__all__ = ["LineSplitter"]


class LineSplitter:
    """Collect bytes; hand out complete lines (without the newline), keeping the rest.

    Blank lines are skipped.  ``buffered`` tells how many bytes await their newline.
    """

    __slots__ = ("_parts", "buffered")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.buffered = 0

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            if data:
                self._parts.append(data)
                self.buffered += len(data)
            return []
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            self._parts.append(tail)
        self.buffered = len(tail)
        return [line for line in lines if line.strip()]
