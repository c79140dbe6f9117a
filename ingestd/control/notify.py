"""systemd notification protocol (sd_notify(3)) in a few lines, after gunicorn's ``systemd.py``.

One datagram to ``$NOTIFY_SOCKET`` per message. Outside systemd (no ``NOTIFY_SOCKET``) every call is
a no-op, and failures are swallowed: systemd says the return value "should generally be ignored".
"""

from __future__ import annotations

import os
import socket
import time

NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        # A leading '@' names a Linux abstract socket, spelled with a NUL byte on the wire.
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block: a full receive queue must not stall the supervisor's loop.
            sock.setblocking(False)
            sock.connect(addr)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog period in seconds systemd asked for, or None if the watchdog is off for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    # WATCHDOG_PID names the process the watchdog is meant for; children may inherit the variable.
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def reloading_message() -> str:
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` systemd ≥ 253 needs in the same datagram."""
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={now_usec}"


def extend_timeout_message(seconds: float) -> str:
    """``EXTEND_TIMEOUT_USEC=``: systemd (≥ 236) lets the current state (here the stop) last at
    least ``seconds`` from now, never less than the unit's own ``TimeoutStopSec=``."""
    return f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}"
