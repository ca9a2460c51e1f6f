"""Splitting an upstream server-sent-event byte stream into event payloads."""

from __future__ import annotations


class SseSplitter:
    """Feed it bytes as they arrive; it returns the `data` payload of each complete event.

    Events end with a blank line; an event split across reads waits for the rest.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._rest + chunk if self._rest else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events = buf.split(b"\n\n")
        self._rest = events.pop()
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
