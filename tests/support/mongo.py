"""MongoDB for tests: the nx-27017 stand-in as a subprocess, or a real server via an env var.

Set ``INGESTD_TEST_MONGO_URI`` to run the same tests against a real mongod, a replica set
(``mongodb://h1,h2,h3/?replicaSet=rs0``) or a mongos: the URI is used exactly as given, options
and all; tests that must stop and restart the server (``mongo_standin``) are skipped then. The
fault proxy sits in front of one server: ``write_target`` finds the one that takes writes.
Each test gets its own database name, so tests never see each other's data; the stand-in runs
with ``--data-dir`` (one SQLite file per database) because its single-file mode shares
collections between database names.

``tests/conftest.py`` imports the fixtures by name; ``stored_ids`` reads back what a test stored.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from pymongo.errors import PyMongoError

from ingestd.tools.standin import StandIn

ENV_URI = "INGESTD_TEST_MONGO_URI"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


# The product's own launcher (used by `ingestd demo`) is the one tests use too.
MongoStandIn = StandIn


def _unique_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^A-Za-z0-9]", "_", request.node.name)[:40]
    return f"t_{base}_{uuid.uuid4().hex[:8]}"


def configured_uri() -> str:
    """``INGESTD_TEST_MONGO_URI`` exactly as set (never rewritten to one host), or ""."""
    return os.environ.get(ENV_URI, "")


def write_target(uri: str) -> tuple[str, int]:
    """The address that takes writes behind ``uri``: the primary of a replica set, else the server
    (standalone or mongos) the driver selected. A proxy in front of a secondary would see only
    NotWritablePrimary."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=10000)
    try:
        client.admin.command("ping")
        address = client.primary or client.address
    finally:
        client.close()
    assert address is not None, f"no server to write to behind {uri}"
    return address


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoStandIn | None]:
    """The session's stand-in, or None when ``INGESTD_TEST_MONGO_URI`` names a real server."""
    if configured_uri():
        yield None
        return
    server = MongoStandIn(tmp_path_factory.mktemp("mongo")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongo_uri(mongo_server: MongoStandIn | None) -> str:
    return configured_uri() or (mongo_server.uri if mongo_server else "")


@pytest.fixture
def mongo_database(request: pytest.FixtureRequest, mongo_uri: str) -> Iterator[str]:
    """A database name used by this test only (dropped afterwards)."""
    name = _unique_name(request)
    yield name
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        client.drop_database(name)
    except PyMongoError:
        pass  # a test that stopped its server: nothing to clean
    finally:
        client.close()


@pytest.fixture
def mongo_client(mongo_uri: str) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, tz_aware=True, serverSelectionTimeoutMS=10000)
    yield client
    client.close()


@pytest.fixture
def mongo_standin(tmp_path: Path) -> Iterator[MongoStandIn]:
    """A private stand-in this test may stop and restart (skipped against a real server)."""
    if configured_uri():
        pytest.skip("needs a server the test can stop and restart (nx-27017 stand-in)")
    server = MongoStandIn(tmp_path / "mongo").start()
    try:
        yield server
    finally:
        server.stop()


def stored_ids(uri: str, database: str) -> list[int]:
    """The ``_id`` of every document in ``database.tweets`` (a list: duplicates would show)."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=10000)
    try:
        return [int(d["_id"]) for d in client[database].tweets.find({}, {"_id": 1})]
    finally:
        client.close()
