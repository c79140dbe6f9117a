"""``ingestd check --online``: the deployment type ``hello`` reports, and write-concern warnings.

Standalone is the stand-in itself; a replica-set member and a mongos are the stand-in behind
tests.support.mongo_proxy with its ``hello`` replies rewritten. The CLI runs as a real process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo.errors import OperationFailure

from ingestd.config.schema import WriteConcernSettings
from ingestd.tools.check import server_hello
from ingestd.tools.mongo_deployment import (
    REPLICA_SET,
    SHARDED,
    STANDALONE,
    Deployment,
    describe,
    write_concern_risks,
)
from tests.support.mongo import ENV_URI, configured_uri, write_target
from tests.support.mongo_proxy import MONGOS_HELLO, MongoProxy, replica_set_hello
from tests.support.simulator import SimProcess
from tests.test_status_check import ingestd, online_config

RS = replica_set_hello("rs0", ("db1:27017", "db2:27017", "db3:27017"))


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    running = SimProcess(tmp_path_factory.mktemp("sim"), "--rate", "10", "--keepalive",
                         "0.5").start()
    yield running
    running.stop()


@pytest.fixture
def proxy(mongo_uri: str) -> Iterator[MongoProxy]:
    with MongoProxy(write_target(mongo_uri)) as running:
        yield running


standalone_only = pytest.mark.skipif(
    bool(configured_uri()), reason="INGESTD_TEST_MONGO_URI may name a replica set or a mongos")


def check(tmp_path: Path, sim: SimProcess, uri: str, **wc: Any) -> tuple[str, list[str]]:
    """stdout of a passing ``check --online``, and its warning lines."""
    extra = {"write_concern": wc} if wc else {}
    result = ingestd("check", "--online", "--config",
                     str(online_config(tmp_path, sim.url, uri, **extra)))
    assert result.returncode == 0, "warnings never change the exit status\n" + result.stdout
    return result.stdout, [ln for ln in result.stdout.splitlines() if ln.startswith("warning:")]


@standalone_only
def test_standalone_with_the_default_write_concern_has_no_warning(
        tmp_path: Path, sim: SimProcess, mongo_uri: str) -> None:
    out, warnings = check(tmp_path, sim, mongo_uri)
    assert "mongo      deployment: standalone server" in out
    assert "mongo      write concern w=majority j=true" in out
    assert warnings == []


@standalone_only
def test_standalone_without_journal_is_warned_about_j_only(
        tmp_path: Path, sim: SimProcess, mongo_uri: str) -> None:
    out, warnings = check(tmp_path, sim, mongo_uri, w=1, j=False)
    assert "deployment: standalone server" in out
    (warning,) = warnings  # w: 1 is all a standalone can give: not a risk there
    assert f"{tmp_path / 'settings.yaml'}: mongo.write_concern.j: j=false" in warning
    assert "crash" in warning


@pytest.mark.parametrize(("hello", "wc", "shown", "warned"), [
    (RS, {"w": 1}, "replica set 'rs0', primary db1:27017, 3 data-bearing members: "
                   "db1:27017, db2:27017, db3:27017", ["w"]),
    (RS, {}, "replica set 'rs0'", []),
    (RS, {"w": 2, "j": True}, "replica set 'rs0'", []),  # 2 of 3 is a majority
    (MONGOS_HELLO, {"w": 1, "j": False}, "sharded cluster (mongos)", ["w", "j"]),
    (MONGOS_HELLO, {"w": "majority", "j": True}, "sharded cluster (mongos)", []),
], ids=["rs-w1", "rs-default", "rs-w2-of-3", "mongos-w1-nojournal", "mongos-default"])
def test_replica_set_and_mongos_are_recognised_and_weak_write_concerns_warned(
        tmp_path: Path, sim: SimProcess, proxy: MongoProxy, hello: dict[str, Any],
        wc: dict[str, Any], shown: str, warned: list[str]) -> None:
    proxy.rewrite_hello(hello)
    out, warnings = check(tmp_path, sim, proxy.uri, **wc)
    assert proxy.count("hello_rewrite") >= 1, "the check's hello went through the proxy"
    assert f"mongo      deployment: {shown}" in out, out
    keys = [w.split("mongo.write_concern.")[1].split(":")[0] for w in warnings]
    assert keys == warned, out
    if "w" in warned:
        assert "roll back" in warnings[0] and "w: majority" in warnings[0]


def test_deployment_from_hello_replies() -> None:
    assert describe({"isWritablePrimary": True}).kind == STANDALONE
    assert describe({"msg": "isdbgrid"}).kind == SHARDED
    rs = describe({"setName": "rs0", "hosts": ["a:1", "b:1"], "passives": ["c:1"],
                   "primary": "a:1"})
    assert rs == Deployment(REPLICA_SET, "rs0", "a:1", ("a:1", "b:1", "c:1"))
    assert describe({"isreplicaset": True}).set_name == "(not initiated)"


@pytest.mark.parametrize(("w", "j", "where", "keys"), [
    ("majority", True, Deployment(SHARDED), []),
    (1, True, Deployment(SHARDED), ["w"]),
    (2, True, Deployment(SHARDED), ["w"]),  # shard sizes unknown from mongos: only "majority"
    (1, True, Deployment(REPLICA_SET, "rs", "a", ("a", "b", "c")), ["w"]),
    (2, True, Deployment(REPLICA_SET, "rs", "a", ("a", "b", "c", "d")), ["w"]),  # 2 of 4
    (3, True, Deployment(REPLICA_SET, "rs", "a", ("a", "b", "c", "d")), []),
    (1, True, Deployment(STANDALONE), []),
    ("majority", False, Deployment(STANDALONE), ["j"]),
])
def test_write_concern_risks(w: int | str, j: bool, where: Deployment, keys: list[str]) -> None:
    assert [k for k, _ in write_concern_risks(WriteConcernSettings(w, j), where)] == keys


# ---------------------------------------------------------------- the test helpers' URI handling


def test_test_uri_is_used_exactly_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "mongodb://h1,h2,h3/?replicaSet=rs0&w=majority"
    monkeypatch.setenv(ENV_URI, uri)
    assert configured_uri() == uri, "a replica-set URI must not be cut down to one host"
    monkeypatch.delenv(ENV_URI)
    assert configured_uri() == ""


def test_write_target_is_the_primary_a_replica_set_uri_discovers(mongo_uri: str) -> None:
    # The proxy, told to answer hello as the primary of rs0 (itself its only member), stands in
    # for a replica set: a replicaSet= URI must be resolved through discovery to that primary.
    with MongoProxy(write_target(mongo_uri)) as rs:
        me = f"127.0.0.1:{rs.port}"
        rs.rewrite_hello(replica_set_hello("rs0", (me,)))
        assert write_target(f"mongodb://{me}/?replicaSet=rs0") == ("127.0.0.1", rs.port)
        assert rs.count("hello_rewrite") >= 1
    if not configured_uri():  # the stand-in: a standalone is its own write target
        assert write_target(mongo_uri) == ("127.0.0.1", int(mongo_uri.rsplit(":", 1)[1]))


def test_a_server_without_hello_is_asked_ismaster() -> None:
    class Admin:
        def command(self, name: str) -> dict[str, Any]:
            if name == "hello":  # MongoDB before 4.4.2
                raise OperationFailure("no such command: 'hello'", 59)
            return {"ismaster": True, "setName": "old"}

    class Client:
        admin = Admin()

    assert describe(server_hello(Client())).set_name == "old"  # type: ignore[arg-type]


# ---------------------------------------------------------------- the user's privileges


def connection_status(*grants: tuple[dict[str, Any], list[str]]) -> dict[str, Any]:
    """``connectionStatus`` (showPrivileges) as a server with access control answers it."""
    return {"ok": 1.0, "authInfo": {
        "authenticatedUsers": [{"user": "ingest", "db": "admin"}],
        "authenticatedUserRoles": [{"role": "custom", "db": "admin"}],
        "authenticatedUserPrivileges": [{"resource": r, "actions": a} for r, a in grants]}}


READ_WRITE = ["find", "insert", "update", "remove", "createIndex", "listIndexes", "dropIndex"]


def test_check_online_names_the_privileges_the_user_lacks(
        tmp_path: Path, sim: SimProcess, proxy: MongoProxy) -> None:
    """A ping needs no privilege: a user whose role lacked insert passed ``check --online`` and
    then stalled the daemon. Now the check lists what the daemon needs and the user lacks."""
    config = online_config(tmp_path, sim.url, proxy.uri)
    proxy.answer("connectionStatus", connection_status(
        ({"db": "", "collection": ""}, ["find", "listIndexes"])))  # a read-only role
    result = ingestd("check", "--online", "--config", str(config))
    assert result.returncode != 0, result.stdout
    failed = [ln for ln in result.stdout.splitlines() if ln.startswith("mongo      FAILED")]
    assert "mongo      FAILED: the user lacks insert, update, remove on check.tweets: the store " \
        "worker stalls until granted" in failed, result.stdout
    assert any("lacks createIndex on check.tweets: tweets are stored, indexes are missing"
               in ln for ln in result.stdout.splitlines() if ln.startswith("warning:"))
    assert "grant the user readWrite on the database" in result.stdout


@pytest.mark.parametrize("resource", [
    {"db": "check", "collection": ""}, {"db": "", "collection": ""}, {"anyResource": True}])
def test_check_online_passes_a_user_with_read_write_on_the_database(
        tmp_path: Path, sim: SimProcess, proxy: MongoProxy, resource: dict[str, Any]) -> None:
    proxy.answer("connectionStatus", connection_status((resource, READ_WRITE)))
    out, warnings = check(tmp_path, sim, proxy.uri)
    assert "mongo      privileges ok for ingest@admin" in out and warnings == []


def test_check_online_without_a_user_says_privileges_were_not_checked(
        tmp_path: Path, sim: SimProcess, mongo_uri: str) -> None:
    out, _ = check(tmp_path, sim, mongo_uri)
    assert "mongo      privileges not checked: no user authenticated" in out
