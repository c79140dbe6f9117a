"""``ingestd status``: a human-readable view of a running daemon, from its run-state files.

Exit codes follow ``systemctl status``: 0 running and healthy, 1 running but degraded,
3 not running (or the state folder holds no live daemon).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from ingestd.runstate import read_status
from ingestd.settings import EXIT_CONFIG, ConfigError, load_settings

EXIT_OK, EXIT_DEGRADED, EXIT_NOT_RUNNING = 0, 1, 3
STALE_AFTER = 10.0  # seconds without a heartbeat before a worker counts as not running


def run_status(config: Path, *, as_json: bool) -> int:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    view = collect(settings.state_dir)
    if as_json:
        sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(view))
    return int(view["exit_code"])


def alive(status: dict[str, Any] | None, now: float) -> bool:
    if not status:
        return False
    pid = status.get("pid")
    if not isinstance(pid, int) or now - float(status.get("time", 0)) > STALE_AFTER:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect(state_dir: Path) -> dict[str, Any]:
    now = time.time()
    roles = {role: read_status(state_dir, role) for role in ("supervisor", "stream", "store")}
    running = {role: alive(st, now) for role, st in roles.items()}
    states = [str((roles[r] or {}).get("state", "")) for r in ("stream", "store")]
    degraded = [s for s in states if s.startswith("degraded")]
    if not running["stream"] or not running["store"]:
        code, health = EXIT_NOT_RUNNING, "down"
    elif degraded:
        code, health = EXIT_DEGRADED, "degraded"
    else:
        code, health = EXIT_OK, "ok"
    return {"state_dir": str(state_dir), "health": health, "reasons": degraded,
            "running": running, "workers": roles, "exit_code": code}


def render(view: dict[str, Any]) -> str:
    w = view["workers"]
    stream, store, sup = w.get("stream") or {}, w.get("store") or {}, w.get("supervisor") or {}
    sc, wc = stream.get("counters", {}), store.get("counters", {})
    spool = stream.get("spool", {})
    lines = [
        f"ingestd: {view['health']}" + (f" ({'; '.join(view['reasons'])})" if view["reasons"]
                                        else ""),
        f"  supervisor  pid {sup.get('pid', '-')}  generation {sup.get('generation', '-')}  "
        f"reload failures {sup.get('reload_failures', 0)}",
        f"  stream      {_run(view, 'stream')}  {stream.get('state', '-')}  "
        f"conn {stream.get('conn', '-')}",
        f"              received {sc.get('received', 0)}  keep-alives {sc.get('keepalives', 0)}  "
        f"rate {stream.get('rate', 0):.1f} msg/s  limit-missed {sc.get('limit_missed', 0)}",
        f"              endings {sc.get('endings', {})}",
        f"  spool       backlog {spool.get('records', 0)} records / "
        f"{spool.get('bytes', 0) / 1e6:.1f} MB",
        f"  store       {_run(view, 'store')}  {store.get('state', '-')}",
        f"              stored {wc.get('stored', 0)}  duplicates {wc.get('duplicates', 0)}  "
        f"dead-lettered {sum(dict(wc.get('deadlettered', {})).values())}  "
        f"deletes {wc.get('deletes_applied', 0)}  rate {store.get('rate', 0):.1f} tweets/s",
    ]
    if wc.get("last_error") or stream.get("last_error"):
        lines.append(f"  last error  {wc.get('last_error') or stream.get('last_error')}")
    return "\n".join(lines)


def _run(view: dict[str, Any], role: str) -> str:
    st = view["workers"].get(role) or {}
    return f"pid {st.get('pid', '-')} {'up' if view['running'][role] else 'DOWN'}"
