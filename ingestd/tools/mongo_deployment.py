"""The MongoDB deployment a ``hello`` reply describes, and what the write concern risks there.

Used by ``ingestd check --online``: the same write concern is safe on one deployment and loses
acknowledged writes on another (docs/reliability.md §3.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ingestd.config.schema import WriteConcernSettings

STANDALONE = "standalone"
REPLICA_SET = "replica set"
SHARDED = "sharded cluster"


@dataclass(frozen=True)
class Deployment:
    kind: str  # STANDALONE | REPLICA_SET | SHARDED
    set_name: str = ""
    primary: str = ""
    members: tuple[str, ...] = ()  # data-bearing members the reply lists (hosts + passives)

    def describe(self) -> str:
        if self.kind == REPLICA_SET:
            return (f"replica set {self.set_name!r}, primary {self.primary or 'none known'}, "
                    f"{len(self.members)} data-bearing members: {', '.join(self.members)}")
        if self.kind == SHARDED:
            return "sharded cluster (mongos)"
        return "standalone server"


def describe(hello: Mapping[str, object]) -> Deployment:
    """The deployment behind a ``hello`` (or legacy ``isMaster``) reply."""
    if hello.get("msg") == "isdbgrid":
        return Deployment(SHARDED)
    if hello.get("setName") or hello.get("isreplicaset"):
        members = [*_texts(hello.get("hosts")), *_texts(hello.get("passives"))]
        return Deployment(REPLICA_SET, set_name=str(hello.get("setName") or "(not initiated)"),
                          primary=str(hello.get("primary") or ""), members=tuple(members))
    return Deployment(STANDALONE)


def write_concern_risks(wc: WriteConcernSettings, where: Deployment) -> list[tuple[str, str]]:
    """``(key, why)`` for every way a write acknowledged under ``wc`` can be lost on ``where``."""
    risks = []
    if where.kind != STANDALONE and not _majority(wc.w, where):
        risks.append(("w", f"w={wc.w} on a {where.kind}: a failover can roll back a batch that "
                           "was acknowledged to ingestd, after the spool has moved past it "
                           "(silent loss); use w: majority"))
    if not wc.j:
        risks.append(("j", "j=false: a server crash within its journal commit interval loses "
                           "batches that were acknowledged to ingestd; use j: true"))
    return risks


def _majority(w: int | str, where: Deployment) -> bool:
    """Whether ``w`` waits for a majority of the data-bearing members (mongos: only "majority")."""
    if w == "majority":
        return True
    if isinstance(w, int) and where.kind == REPLICA_SET and where.members:
        return w > len(where.members) // 2
    return False


def _texts(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else []
