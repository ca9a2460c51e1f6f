"""sd_notify(3) by hand: READY, STATUS, WATCHDOG and STOPPING on systemd's notify socket.

The protocol is one datagram of newline-separated `KEY=value` lines to the
unix socket named by `NOTIFY_SOCKET` (a leading `@` names the abstract
namespace). Outside systemd the variable is unset and every call does
nothing, so the daemon needs no special case.
"""

from __future__ import annotations

import os
import socket

from llmsvc.logs import logger

log = logger(__name__)


class Notifier:
    """Sends state changes to systemd; silent no-op without a notify socket."""

    def __init__(self, notify_socket: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _address(notify_socket) if notify_socket else None
        # systemd expects a ping at least every WATCHDOG_USEC; half leaves room for a slow beat.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self._failing = ""  # the last error, logged once until a send succeeds again

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one datagram; False if it could not go (logged once per error)."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop: with the receiver's queue full, a send fails instead.
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if str(exc) != self._failing:
                log.warning("systemd notify failed", socket=self.address, error=exc)
            self._failing = str(exc)
            return False
        self._failing = ""
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(notify_socket: str) -> str:
    """A path, or an abstract socket name with its leading NUL (systemd writes it as `@`)."""
    return "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
