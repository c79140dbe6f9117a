"""Two template instances (``ingestd@a``, ``ingestd@b``) in the container the plain unit ran in.

The plain ``ingestd.service`` is turned into instance ``a`` and ``b`` is added, both with the
README's own lines ("Outgrowing one machine"). Each instance has its own account (the simulator
accepts two credential sets and, as the endpoint, allows one connection per set), its own
keywords, metrics port, database and state folder. A connection belongs to the instance whose
keywords it asked for, so each instance is reconciled against its own connections' ground truth.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pymongo
import yaml

from ingestd.tools.standin import free_port
from tests.support.creds import CREDS
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until
from tests.systemd.deployment import Deployment
from tests.systemd.install import WORKDIR, run_block, sh_block

SECTION = "Outgrowing one machine"
README_NAME = "news"  # the instance name the README's blocks use
TRACK = {"a": ["coffee", "tea"], "b": ["rain", "snow"]}
# b's own account: the same shape as the test credentials, other values.
CREDS_B = {k: v[:-6] + "bbbbbb" for k, v in CREDS.items()}
# DynamicUser= keeps StateDirectory=ingestd/%i under /var/lib/private/ingestd/%i.
STATE = "var/lib/private/ingestd"


class Instance:
    """One ``ingestd@NAME`` unit: its settings, account and share of the ground truth."""

    def __init__(self, name: str, doc: dict[str, Any], creds: dict[str, str]) -> None:
        self.name = name
        self.unit = f"ingestd@{name}"
        self.config = f"/etc/ingestd/{name}.yaml"
        self.doc = doc
        self.creds = creds
        self.metrics_port = int(doc["metrics"]["listen"].rsplit(":", 1)[1])
        self.tracks = [list(doc["stream"]["track"])]  # every filter it was given, in order


class Instances:
    """Both instances, the simulator they share and the container they run in."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.sim = SimProcess(dep.workdir / "sim-instances", "--rate", "200", "--max-tweets",
                              "60", "--control-every", "10", "--keepalive", "1", "--seed", "11",
                              "--credentials", str(self._credentials_file()))
        self.members = {name: Instance(name, self._doc(name), creds)
                        for name, creds in (("a", CREDS), ("b", CREDS_B))}

    def _credentials_file(self) -> Path:
        path = self.dep.workdir / "sim-credentials.yaml"
        path.write_text(yaml.safe_dump([CREDS, CREDS_B]))
        return path

    def _doc(self, name: str) -> dict[str, Any]:
        doc = yaml.safe_load(yaml.safe_dump(self.dep.doc))  # a deep copy of the plain unit's
        doc["stream"]["track"] = list(TRACK[name])
        doc["mongo"]["database"] = f"{self.dep.database}_{name}"
        doc["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
        doc["state_dir"] = None
        return doc

    @property
    def box(self) -> Any:
        return self.dep.box_

    # -- the README's lines ---------------------------------------------------------------------

    def start(self) -> Instances:
        self.sim.start()
        for member in self.members.values():
            member.doc["stream"]["url"] = self.sim.url
        readme = self.dep.src / "README.md"
        self.transcript = run_block(self.box, self._named(
            sh_block(readme, SECTION, "From ingestd.service to an instance"), "a"), {})
        for name, member in self.members.items():
            self.box.run("sh", "-c", f"cat > {WORKDIR}/{name}.yaml",
                         input=yaml.safe_dump(member.doc, sort_keys=False))
            self.transcript += "\n" + run_block(
                self.box, self._named(sh_block(readme, SECTION, "Add an instance"), name),
                member.creds)
        return self

    @staticmethod
    def _named(block: str, name: str) -> str:
        assert README_NAME in block, f"the README's block names no instance {README_NAME!r}"
        return block.replace(README_NAME, name)

    def stop(self) -> None:
        self.sim.stop()

    # -- looking at one instance ----------------------------------------------------------------

    def show(self, name: str, *props: str) -> dict[str, str]:
        return dict(self.box.show(f"ingestd@{name}", *props))

    def wait_active(self, name: str, timeout: float = 60.0) -> dict[str, str]:
        def active() -> dict[str, str]:
            props = self.show(name, "ActiveState", "SubState", "MainPID", "Result")
            if props["ActiveState"] == "failed":
                raise AssertionError(f"ingestd@{name} failed: {props}\n{self.journal()}")
            return props if props["SubState"] == "running" else {}
        return wait_until(active, timeout, f"ingestd@{name} active (running)", interval=0.2)

    def write_doc(self, name: str, doc: dict[str, Any]) -> None:
        config = self.members[name].config
        self.box.run("sh", "-c", f"umask 022; cat > {config}.new && mv -f {config}.new {config}",
                     input=yaml.safe_dump(doc, sort_keys=False))
        self.members[name].doc = doc
        self.members[name].tracks.append(list(doc["stream"]["track"]))

    def root_shell(self, command: str) -> tuple[int, str]:
        result = self.box.run(*shlex.split(command), check=False, timeout=60)
        return result.returncode, result.stdout + result.stderr

    def journal(self) -> str:
        return str(self.box.journal("ingestd@a", "ingestd@b"))

    def state_dir(self, name: str) -> Path:
        """The instance's state folder, seen from the host."""
        return Path(self.box.root) / STATE / name

    # -- ground truth per instance ----------------------------------------------------------------

    def connections(self, name: str) -> list[dict[str, Any]]:
        """The 200-answered connections that asked for one of this instance's filters."""
        tracks = self.members[name].tracks
        return [c for c in self.sim.ground_truth().connections()
                if c["status"] == 200 and list(c["params"].get("track", [])) in tracks]

    def expected(self, name: str) -> set[int]:
        """Delivered on this instance's connections, minus what they were told was deleted."""
        truth = self.sim.ground_truth()
        conns = {c["conn"] for c in self.connections(name)}
        delivered = {i for c in conns for i in truth.tweet_ids(c)}
        deleted = {e["id"] for c in conns for e in truth.control("delete", c)}
        return delivered - deleted

    def stored_ids(self, name: str) -> list[int]:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.dep.mongo_uri, serverSelectionTimeoutMS=10000)
        try:
            db = client[self.members[name].doc["mongo"]["database"]]
            return [int(d["_id"]) for d in db.tweets.find({}, {"_id": 1})]
        finally:
            client.close()

    def wait_stored(self, name: str, timeout: float = 60.0) -> set[int]:
        def caught_up() -> set[int]:
            want = self.expected(name)
            return want if want and set(self.stored_ids(name)) == want else set()
        return wait_until(caught_up, timeout, f"ingestd@{name} to store every delivered tweet",
                          interval=0.3)
