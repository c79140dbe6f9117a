"""A stand-in for systemd's notify socket, to read what the daemon sends (sd_notify)."""

from __future__ import annotations

import socket
import time
import uuid


class NotifySocket:
    """A real AF_UNIX datagram socket in the abstract namespace; ``name`` goes in NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.name = f"@ingestd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.received: list[str] = []

    def receive(self, timeout: float) -> str | None:
        """The next datagram, or None if none came within ``timeout``."""
        self.sock.settimeout(max(timeout, 0.001))  # 0 would make the socket non-blocking
        try:
            data = self.sock.recv(65536).decode()
        except TimeoutError:
            return None
        self.received.append(data)
        return data

    def wait_for(self, prefix: str, timeout: float = 10, contains: str = "") -> str:
        """Read datagrams until one starts with ``prefix`` (and contains ``contains``)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and message.startswith(prefix) and contains in message:
                return message
        raise AssertionError(f"no {prefix!r} datagram within {timeout}s; got {self.received}")

    def drain(self) -> list[str]:
        """Everything already queued on the socket."""
        messages = []
        while (message := self.receive(0.001)) is not None:
            messages.append(message)
        return messages

    def close(self) -> None:
        self.sock.close()


def kinds(messages: list[str]) -> list[str]:
    """The first line of each datagram, WATCHDOG and STATUS-only updates left out."""
    first = [m.split("\n", 1)[0] for m in messages]
    return [k for k in first if k.split("=")[0] not in ("WATCHDOG", "STATUS")]
