"""systemd's side of the notify protocol, for tests: a bound datagram socket and what it got."""

from __future__ import annotations

import socket
import time


class FakeSystemd:
    """A bound notify socket and the messages received on it, each a dict of its lines."""

    def __init__(self, address: str, name: str) -> None:
        self.name = name  # what NOTIFY_SOCKET says
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(message)
        return message

    def wait_for(self, key: str, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def drain(self) -> None:
        """Forget what is queued: messages sent before now."""
        while self.receive(0.05) is not None:
            pass
        self.messages.clear()

    def count(self, key: str, seconds: float) -> int:
        """How many messages with `key` arrive within `seconds`."""
        found, deadline = 0, time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            found += message is not None and key in message
        return found
