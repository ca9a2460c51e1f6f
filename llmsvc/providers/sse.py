"""Splitting an upstream server-sent-event byte stream into event payloads."""

from __future__ import annotations

from llmsvc.providers.fields import UPSTREAM_MAX_BYTES, TooLarge


class SseSplitter:
    """Feed it bytes as they arrive; it returns the `data` payload of each complete event.

    Events end with a blank line; an event split across reads waits for the rest, up to
    `limit` bytes (TooLarge past it). Its reads are kept as they came and joined once it
    ends: a large event costs its size, not its size times its reads.
    """

    def __init__(self, limit: int = UPSTREAM_MAX_BYTES) -> None:
        self.limit = limit
        self._parts: list[bytes] = []  # the unfinished event
        self._size = 0
        self._tail = b""  # its last bytes: a blank line may start there

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._parts:
            edge = self._tail + chunk[:2]
            if not (b"\n\n" in chunk or b"\n\r\n" in chunk or b"\n\n" in edge or b"\n\r\n" in edge):
                self._parts.append(chunk)  # still the same event
                self._size += len(chunk)
                self._tail = (self._tail + chunk)[-2:]
                if self._size > self.limit:
                    raise TooLarge(f"an event is over {self.limit} bytes")
                return []
            buf = b"".join([*self._parts, chunk])
        else:
            buf = chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events = buf.split(b"\n\n")
        rest = events.pop()
        self._parts, self._size, self._tail = (
            ([rest], len(rest), rest[-2:]) if rest else ([], 0, b"")
        )
        if len(buf) > self.limit and max(map(len, [*events, rest])) > self.limit:
            raise TooLarge(f"an event is over {self.limit} bytes")
        payloads = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                payloads.append(event[6:])  # the usual one-line event
                continue
            lines = event.split(b"\n")
            data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
            if data:
                payloads.append(b"\n".join(data))
        return payloads
