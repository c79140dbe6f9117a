"""``check --online``: is a stream on these settings running? A v1.1 probe would log it out.

Two signs, both read without taking anything: the supervisor's flock on the state folder (looked
up in ``/proc/locks``: taking even a shared lock could make a starting supervisor fail), and, in a
standby pair, a lease whose holder is still renewing it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ingestd.config.schema import Settings
from ingestd.control import runstate
from ingestd.control.daemonctl import LOCKFILE, PIDFILE

PROC_LOCKS = Path("/proc/locks")
LOOK_INTERVAL = 0.05  # s between reads of the lease while waiting for a renewal


def state_dir_holder(state_dir: Path) -> str:
    """Why the state folder is in use by a daemon ("" if it is not)."""
    lock = state_dir / runstate.RUN_DIR / LOCKFILE
    try:
        st = lock.stat()
    except FileNotFoundError:
        return ""  # no daemon ever started on this state folder
    except OSError as exc:
        return (f"cannot tell whether a daemon uses the state folder {state_dir} "
                f"({exc.strerror}): run check as the daemon's user")
    held = flock_held(st.st_dev, st.st_ino)
    if held is None:  # no /proc/locks: the pid file names a live process or not
        held = _pidfile_alive(state_dir)
    if not held:
        return ""
    return f"a running ingestd holds this settings' state folder {state_dir} ({lock})"


def flock_held(dev: int, ino: int) -> bool | None:
    """Whether any process holds a flock on that file; None if ``/proc/locks`` is unreadable."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a blocked waiter's line has "->")
    return any(f[1] == "FLOCK" and f[5] == want for f in (ln.split() for ln in lines)
               if len(f) > 5 and f[1] != "->")


def _pidfile_alive(state_dir: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((state_dir / runstate.RUN_DIR / PIDFILE).read_text()), 0)
        return True
    return False


def lease_holder(settings: Settings) -> str:
    """Why the standby lease shows a live holder ("" if it is free or its holder is silent).

    A holder renews every ``renew_interval``: a lease that moves within two of them (plus a
    round trip) is live. One that does not is expired or about to be, as a standby sees it.
    """
    from pymongo.errors import PyMongoError

    from ingestd.control.lease import renew_interval
    from ingestd.sink.mongo import make_client

    ha = settings.ha
    client = make_client(settings.mongo)
    try:
        coll = client[settings.mongo.database][ha.collection]
        first = coll.find_one({"_id": ha.lease_key})
        if first is None or first.get("holder") is None:
            return ""
        seen = _state(first)
        deadline = time.monotonic() + min(2 * renew_interval(ha.lease_seconds) + 0.5,
                                          ha.lease_seconds)
        while time.monotonic() < deadline:
            time.sleep(LOOK_INTERVAL)  # polling a remote document: there is no event to await
            doc = coll.find_one({"_id": ha.lease_key})
            if doc is not None and doc.get("holder") is not None and _state(doc) != seen:
                return (f"the standby lease {ha.lease_key} is held by "
                        f"{doc.get('holder')}, which is renewing it (streaming)")
    except PyMongoError as exc:
        return f"the standby lease could not be read ({type(exc).__name__})"
    finally:
        client.close()
    return ""


def _state(doc: dict[str, object]) -> tuple[object, ...]:
    return doc.get("holder"), doc.get("term"), doc.get("renew")
