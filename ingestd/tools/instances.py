"""What ``ingestd check`` warns about when a stream outgrows one connection or shares a host.

Warnings, not errors (the exit status stays 0): each names the file, the key, the figure and the
limit. v1.1's per-connection limits (400 phrases, 5,000 ids, 25 boxes) are errors already, in
``ingestd/config/stream.py``: the endpoint refuses more with 413. v2's limits depend on the app's
access level, which the settings do not name, so exceeding a level is only worth a warning; and
a metrics port another process holds costs the metrics, not the stream.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Sequence

from ingestd.config.schema import Settings
from ingestd.config.stream_v2 import V2_ACCESS_LEVELS
from ingestd.control.daemonctl import locate_state_dir, supervisor_pid
from ingestd.control.status import metrics_address

SPLIT_HINT = "split them across instances, each with its own app (README: Outgrowing one machine)"


def instance_warnings(settings: Settings) -> list[str]:
    """Every warning of this module for one settings file, in key order."""
    return rule_warnings(settings) + metrics_port_warnings(settings)


# -- v2 rules against the access levels ---------------------------------------------------------


def rule_warnings(settings: Settings) -> list[str]:
    """Rules over an access level's count or length limit (docs/protocol.md §7.3)."""
    if settings.stream.api != "v2":
        return []
    where, rules = settings.path, settings.stream.rules
    counts = [(name, most) for name, most, _ in V2_ACCESS_LEVELS]
    lengths = [(name, longest) for name, _, longest in V2_ACCESS_LEVELS]
    warnings = []
    if over := _over(len(rules), counts):
        warnings.append(f"{where}: stream.rules: {len(rules):,} rules, {over}: {SPLIT_HINT}, "
                        f"or use a higher access level")
    for index, rule in enumerate(rules):
        if over := _over(len(rule.value), lengths):
            warnings.append(f"{where}: stream.rules[{index}].value: {len(rule.value):,} "
                            f"characters, {over}: split it into shorter rules (each OR "
                            f"alternative can be a rule of its own)")
    return warnings


def _over(figure: int, limits: Sequence[tuple[str, int]]) -> str:
    """``over the limit of Essential (5) and Elevated (25) access; Academic and Pro allow
    1,000, Enterprise 2,500``, or "" when every level allows ``figure``."""
    refusing = [f"{name} ({limit:,})" for name, limit in limits if figure > limit]
    if not refusing:
        return ""
    by_limit: dict[int, list[str]] = {}
    for name, limit in limits:
        if figure <= limit:
            by_limit.setdefault(limit, []).append(name)
    allowing = ", ".join(f"{_and(names)} allow{'s' * (len(names) == 1)} {limit:,}"
                         for limit, names in by_limit.items())
    return (f"over the limit of {_and(refusing)} access; "
            f"{allowing or 'no access level documents so many'}")


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


# -- the metrics port -----------------------------------------------------------------------------


def metrics_port_warnings(settings: Settings) -> list[str]:
    """``metrics.listen`` held by another process: two instances left on the same port."""
    address = settings.metrics.address()
    if address is None or address[1] == 0:
        return []
    host, port = address
    problem = _bind_problem(host, port)
    if problem is None or _held_by_this_daemon(settings, port):
        return []
    return [f"{settings.path}: metrics.listen: {settings.metrics.listen} {problem}; the daemon "
            f"would run without metrics. Each instance on a host needs its own port in its "
            f"settings file"]


def _bind_problem(host: str, port: int) -> str | None:
    """Why the metrics listener could not bind ``host:port`` now (None: it could)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as sock:
        # As http.server does: a port in TIME_WAIT is free for it, so it is free for us too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use (another ingestd instance?)"
            return f"cannot be bound ({os.strerror(exc.errno) if exc.errno else exc})"
    return None


def _held_by_this_daemon(settings: Settings, port: int) -> bool:
    """`check` run on the settings of a running daemon: the port is its own."""
    state_dir = locate_state_dir(settings)
    held = metrics_address(state_dir)
    return (held is not None and held.rsplit(":", 1)[-1] == str(port)
            and supervisor_pid(state_dir) is not None)
