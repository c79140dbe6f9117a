"""Which MongoDB privileges the daemon needs, and which of them the user in ``mongo.uri`` lacks.

Used by ``ingestd check --online``: a ping needs no privilege, so a user whose role lacks
``insert`` passed the check and then stalled the daemon (``degraded: mongo rejects our
configuration (the user lacks the insert privilege on …)``). ``connectionStatus`` with
``showPrivileges`` lists what the authenticated user may do, per resource.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ingestd.config.schema import Settings

# Without these the store worker cannot move the spool past a batch: it retries at the cap.
DATA_ACTIONS = ("find", "insert", "update", "remove")
# Without these tweets are stored, but indexes are missing (degraded) or a TTL change is made
# by dropping and creating the index instead of collMod.
INDEX_ACTIONS = ("createIndex", "listIndexes")


@dataclass(frozen=True)
class Lack:
    namespace: str
    actions: tuple[str, ...]
    blocking: bool  # the daemon cannot store without them (else: degraded only)

    def describe(self) -> str:
        effect = ("the store worker stalls until granted" if self.blocking
                  else "tweets are stored, indexes are missing")
        return f"the user lacks {', '.join(self.actions)} on {self.namespace}: {effect}"


def needed(settings: Settings) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``namespace: (blocking actions, index actions)`` for every collection the daemon uses."""
    mongo = settings.mongo
    db = mongo.database
    out = {
        f"{db}.{mongo.collection}": (DATA_ACTIONS, INDEX_ACTIONS),
        f"{db}.{mongo.collection}_deleted": (("find", "insert"), INDEX_ACTIONS),
        f"{db}.{mongo.coverage_collection}": (("find", "insert", "update"), ()),
    }
    if settings.ha.mode == "standby":
        out[f"{db}.{settings.ha.collection}"] = (("find", "insert", "update"), ())
    return out


def users(status: Mapping[str, object]) -> list[str]:
    """The users a ``connectionStatus`` reply says are authenticated (``user@db``)."""
    auth = status.get("authInfo")
    found = auth.get("authenticatedUsers") if isinstance(auth, Mapping) else None
    return [f"{u.get('user')}@{u.get('db')}" for u in found or () if isinstance(u, Mapping)]


def lacking(status: Mapping[str, object], settings: Settings) -> list[Lack]:
    """What the authenticated user lacks, per namespace (blocking ones first)."""
    auth = status.get("authInfo")
    privileges = auth.get("authenticatedUserPrivileges") if isinstance(auth, Mapping) else None
    grants = [p for p in privileges or () if isinstance(p, Mapping)]
    out = []
    for namespace, (data, index) in needed(settings).items():
        db, coll = namespace.split(".", 1)
        have = granted(grants, db, coll)
        for actions, blocking in ((data, True), (index, False)):
            if missing := tuple(a for a in actions if a not in have):
                out.append(Lack(namespace, missing, blocking))
    return sorted(out, key=lambda lack: not lack.blocking)


def granted(privileges: Iterable[Mapping[str, object]], db: str, coll: str) -> set[str]:
    """The actions granted on ``db.coll``: by a resource naming it, its database (collection
    ""), the collection in any database (db ""), every database, or ``anyResource``."""
    actions: set[str] = set()
    for privilege in privileges:
        resource = privilege.get("resource")
        if not isinstance(resource, Mapping):
            continue
        if resource.get("anyResource") is True or (
                resource.get("db") in ("", db) and resource.get("collection") in ("", coll)):
            acts = privilege.get("actions")
            if isinstance(acts, list):
                actions.update(a for a in acts if isinstance(a, str))
    return actions
