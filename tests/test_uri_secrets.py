"""The MongoDB password is never printed, whatever characters it holds.

The secrets audit: ``check`` and ``coverage`` printed ``mongodb://ingest:MONGO#PW-123@…``: the
text scrubber's URL pattern ends the user information at ``#`` or a space, where pymongo does
not, and ``coverage`` registered no secret for its error texts. Each password here is one pymongo
accepts (its own parser says so first), raw where it takes the character raw, percent-encoded
where it must be.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
import yaml
from pymongo.errors import ServerSelectionTimeoutError
from pymongo.uri_parser import parse_uri

from ingestd.config.errors import ConfigErrors
from ingestd.config.settings import load_settings
from ingestd.logs import clear_secrets
from tests.support.creds import CREDS
from tests.support.daemon import settings_doc

HOST = "db.invalid:27017/?authSource=admin"
# (as written in the URI, the pieces that must never be shown): raw '#', ' ' and '+', and
# percent-encoded '@', '?', ':', '/', '#' and ' '.
PASSWORDS = [
    "MONGO#PW-123", "cnry pw with spaces", "cnry#mixed pw", "cnry+plus",
    "cnry%40at", "cnry%3Fquery", "cnry%3Acolon", "cnry%2Fslash", "cnry%23hash", "cnry%20sp",
]


def pieces(password: str) -> list[str]:
    """Every fragment of the password (as written and as decoded) a leak would show."""
    decoded = unquote_plus(password)
    parts = {password, decoded, *password.replace("%", " ").replace("#", " ").split(),
             *decoded.replace("#", " ").split()}
    return sorted(p for p in parts if len(p) >= 3 and p not in ("ingest",))


@pytest.fixture(autouse=True)
def _no_registered_secrets() -> Iterator[None]:
    yield
    clear_secrets()  # run in-process, a command registers them for the whole process


def write_config(tmp_path: Path, uri: str, **ha: Any) -> Path:
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", uri, "secrets")
    doc["mongo"]["timeout_ms"] = 500
    doc["state_dir"] = str(tmp_path / "state")
    if ha:
        doc["ha"] = ha
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")} | CREDS


@pytest.mark.parametrize("password", PASSWORDS)
def test_display_uri_hides_what_pymongo_takes_as_the_password(tmp_path: Path,
                                                              password: str) -> None:
    uri = f"mongodb://ingest:{password}@{HOST}"
    assert parse_uri(uri)["password"] == unquote_plus(password)  # pymongo accepts it
    shown = load_settings(write_config(tmp_path, uri), env()).mongo.display_uri()
    assert shown == f"mongodb://***@{HOST}"


@pytest.mark.parametrize("password", ["cnry@at", "cnry?query", "cnry:colon", "cnry/slash",
                                      "cnry?w=x@more"])
def test_a_password_pymongo_refuses_raw_is_not_quoted_in_the_refusal(tmp_path: Path,
                                                                    password: str) -> None:
    config = write_config(tmp_path, f"mongodb://ingest:{password}@{HOST}")
    with pytest.raises(ConfigErrors) as refused:
        load_settings(config, env())
    text = str(refused.value)
    assert "mongo.uri: invalid MongoDB URI" in text
    assert not [p for p in pieces(password) if p in text], text


def ingestd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env())


@pytest.mark.parametrize("password", ["MONGO#PW-123", "cnry pw#2 x"])
def test_check_and_coverage_never_print_the_password(tmp_path: Path, password: str) -> None:
    """``check`` (the standby lease's line), ``check --online`` and ``coverage`` against a
    MongoDB that refuses the connection: each names where it looked, with ``***@``."""
    where = "mongodb://***@127.0.0.1:9/?authSource=admin"
    config = write_config(tmp_path, f"mongodb://ingest:{password}@127.0.0.1:9/?authSource=admin",
                          mode="standby", instance="a")
    offline, online = ingestd(config, "check"), ingestd(config, "check", "--online")
    coverage = ingestd(config, "coverage")
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert f"in secrets.leases at {where}" in offline.stdout
    assert online.returncode == coverage.returncode == 69
    assert f"MongoDB is not reachable at {where}" in online.stdout
    assert f"coverage: MongoDB is not reachable at {where}" in coverage.stderr
    text = "".join(r.stdout + r.stderr for r in (offline, online, coverage))
    assert not [p for p in pieces(password) if p in text], text
    assert "ingest:" not in text


class _Admin:
    def command(self, name: str, **options: object) -> dict[str, object]:
        return {"ok": 1.0, "isWritablePrimary": True} if name == "hello" else {"ok": 1.0}


class _Client:
    admin = _Admin()

    def close(self) -> None:
        pass


def test_check_reachable_line_hides_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from ingestd.sink import mongo
    from ingestd.tools.check import check_mongo

    monkeypatch.setattr(mongo, "make_client", lambda _settings: _Client())
    settings = load_settings(write_config(tmp_path, f"mongodb://ingest:MONGO#PW-123@{HOST}"),
                             env())
    assert check_mongo(settings)
    out = capsys.readouterr().out
    assert f"mongo      reachable (ping ok) at mongodb://***@{HOST}" in out
    assert "PW-123" not in out


def test_coverage_masks_the_password_in_a_driver_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A driver's error text can quote anything; coverage registers the resolved secrets, as
    check and the daemon do, so the scrubber masks them in it."""
    from ingestd.tools import coverage

    def failing(*_args: object) -> None:
        raise ServerSelectionTimeoutError("auth with password cnry pw#2 x failed")

    monkeypatch.setattr(coverage, "fetch", failing)
    config = write_config(tmp_path, "mongodb://ingest:cnry%20pw%232%20x@127.0.0.1:9/")
    code = coverage.run_coverage(config, since=None, until=None, instance=None, as_json=False)
    err = capsys.readouterr().err
    assert code == 69
    assert "auth with password *** failed" in err, err
    assert "cnry" not in err
