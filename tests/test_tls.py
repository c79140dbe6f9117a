"""TLS where production lives: the stream endpoint and MongoDB behind a TLS-terminating front,
with certificates a throwaway CA issued (``tests.support.tls``), on the real daemon and CLI.

Every failed certificate check is libcurl's error 60 (and pymongo's one CERTIFICATE_VERIFY_FAILED):
the operator needs the cause (expired, wrong host, a missing intermediate) and the setting to
change, not "set stream.ca_file" for a certificate no bundle can fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from ingestd.config.errors import EXIT_UNAVAILABLE
from tests.support.creds import CREDS
from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import configured_uri, stored_ids
from tests.support.simulator import SimProcess
from tests.support.tls import Certs, TlsFront, make_certs
from tests.support.wait import wait_until
from tests.test_status_check import ingestd, online_config

PATH = "/1.1/statuses/filter.json"
UNTRUSTED = "not signed by a trusted CA"  # the one cause the old code gave for every failure

# certificate served -> (words of the cause, the setting it names)
STREAM_CAUSES = {
    "expired": ("certificate has expired", "stream.ca_file cannot help"),
    "not_yet_valid": ("certificate is not valid yet", "check this host's clock"),
    "wrong_host": ("certificate is for another host name", "stream.url must name a host"),
    "missing_intermediate": ("does not send its intermediate certificate",
                             "set stream.ca_file to that CA's certificate bundle"),
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def served(certs: Certs, kind: str) -> tuple[Path, Path]:
    """(certificate file, key) a server with this kind of certificate problem sends."""
    if kind == "missing_intermediate":
        return certs.leaf("good"), certs.key("good")  # the leaf without its intermediate
    return certs.chain(kind), certs.key(kind)


def stream_url(port: int) -> str:
    return f"https://127.0.0.1:{port}{PATH}"


def no_secret_in(text: str) -> None:
    for value in CREDS.values():
        assert value not in text


@pytest.mark.parametrize("kind", list(STREAM_CAUSES))
def test_check_online_names_the_certificate_problem(tmp_path: Path, kind: str, certs: Certs,
                                                    mongo_uri: str) -> None:
    """Expired, not yet valid, another host's, a chain without its intermediate: ``check
    --online`` said "not signed by a trusted CA … set stream.ca_file" for each."""
    with TlsFront(*served(certs, kind)) as front:
        config = online_config(tmp_path, stream_url(front.port), mongo_uri)
        doc = yaml.safe_load(config.read_text())
        doc["stream"]["ca_file"] = str(certs.ca)
        config.write_text(yaml.safe_dump(doc))
        result = ingestd("check", "--online", "--config", str(config))
    assert result.returncode == EXIT_UNAVAILABLE, result.stdout + result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("endpoint   FAILED"))
    cause, setting = STREAM_CAUSES[kind]
    assert cause in line and setting in line and "curl error 60" in line, line
    if kind != "missing_intermediate":
        assert UNTRUSTED not in line, line
    no_secret_in(result.stdout + result.stderr)


@pytest.mark.parametrize("kind", ["expired", "wrong_host"])
def test_the_daemon_names_the_certificate_problem_and_keeps_retrying(
        tmp_path: Path, kind: str, certs: Certs, mongo_uri: str) -> None:
    """The reconnect reason in the log and the status: the cause and its setting, on the
    network schedule (the server's fix heals it: no stop, no tight loop)."""
    with TlsFront(*served(certs, kind)) as front:
        doc = settings_doc(stream_url(front.port), mongo_uri, "tls_cause")
        doc["stream"]["ca_file"] = str(certs.ca)
        daemon = Daemon(tmp_path / "daemon", doc)
        try:
            daemon.start().wait_ready()
            daemon.wait_log("stream_ended", conn=2, ending="tls_certificate")
            state = wait_until(lambda: str(daemon.status("stream").get("state", "")), 10,
                               "the stream's state")
            # the counts are published once a second: the second ending may not be in them yet
            counted = wait_until(
                lambda: (c := daemon.counters("stream").get("endings", {})).get(
                    "tls_certificate", 0) >= 2 and c, 10, "both endings counted")
            code, _ = daemon.stop()
        finally:
            daemon.kill()
    assert code == 0
    ended = daemon.events("stream_ended")
    cause, setting = STREAM_CAUSES[kind]
    for text in (ended[0]["reason"], state):
        assert cause in text and setting in text and "curl error 60" in text, text
        assert UNTRUSTED not in text, text
    assert all(e["backoff"] > 0 for e in ended)
    # counted apart from network blips (ingestd_stream_reconnects_total{reason})
    assert counted.get("tls_certificate", 0) >= 2 and not counted.get("network"), counted
    assert not daemon.events("stream_rejected")
    no_secret_in(daemon.logs())


def test_a_ca_file_replaced_in_place_is_read_by_the_next_connection(
        tmp_path: Path, certs: Certs, mongo_uri: str) -> None:
    """A CA rotation: the operator writes the new bundle over ``stream.ca_file`` and reloads.
    libcurl kept the CA store it had built from that file name for 24 hours: every reconnect
    still failed with the old bundle, whatever the file held or a reload did."""
    bundle = tmp_path / "bundle.pem"
    shutil.copy(certs.ca, bundle)  # a CA that did not issue the server's (self-signed) certificate
    with TlsFront(certs.leaf("self"), certs.key("self")) as front:  # answers 503 once trusted
        doc = settings_doc(stream_url(front.port), mongo_uri, "tls_rotation")
        doc["stream"]["ca_file"] = str(bundle)
        daemon = Daemon(tmp_path / "daemon", doc)
        try:
            daemon.start().wait_ready()
            ended = daemon.wait_log("stream_ended", ending="tls_certificate")
            assert "self-signed certificate" in ended["reason"], ended
            rotated = tmp_path / "bundle.pem.new"
            shutil.copy(certs.leaf("self"), rotated)
            os.replace(rotated, bundle)
            daemon.send(signal.SIGHUP)
            daemon.wait_log("reload_applied", role="stream")
            answered = daemon.wait_log("stream_ended", ending="http", timeout=30)
            code, _ = daemon.stop()
        finally:
            daemon.kill()
    assert code == 0
    assert "503" in answered["reason"], answered
    assert front.handshakes >= 1


def mongo_address(mongo_uri: str) -> tuple[str, int]:
    if configured_uri():
        pytest.skip("fronts the nx-27017 stand-in with TLS (a real server has its own)")
    parts = urlsplit(mongo_uri)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def test_an_untrusted_mongodb_certificate_is_named_in_the_status(
        tmp_path: Path, certs: Certs, mongo_uri: str) -> None:
    """``tls=true`` to a server whose certificate has expired: the store's status said only
    "mongo unavailable (ServerSelectionTimeoutError)", the log pymongo's text without the option
    to look at."""
    upstream = mongo_address(mongo_uri)
    with TlsFront(*served(certs, "expired"), upstream=upstream) as front:
        uri = (f"mongodb://127.0.0.1:{front.port}/?tls=true&tlsCAFile={certs.ca}"
               "&directConnection=true")
        doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", uri, "tls_mongo")
        doc["mongo"]["timeout_ms"] = 2000
        # The stop comes with MongoDB unusable: the store worker's drain can only wait out its
        # budget (control.stop_timeout, 10 s by default), whose length is no part of this test.
        doc["control"]["stop_timeout"] = 3
        daemon = Daemon(tmp_path / "daemon", doc)
        try:
            daemon.start()
            failed = daemon.wait_log("mongo_write_failed")
            def degraded() -> str | None:
                state = str(daemon.status("store").get("state", ""))
                return state if state.startswith("degraded") else None
            store = wait_until(degraded, 30, "the store's status")
            last = wait_until(lambda: daemon.status("store").get("counters", {})
                              .get("last_error") or None, 30, "the store's last error")
            code, _ = daemon.stop()
        finally:
            daemon.kill()
    assert code == 0
    for text in (failed["cause"], str(store), str(last)):
        assert "certificate has expired" in text and "tlsCAFile in mongo.uri" in text, text
    no_secret_in(daemon.logs())


def test_stream_and_mongodb_over_tls_store_every_tweet_across_a_reconnect(
        tmp_path: Path, certs: Certs, mongo_uri: str, mongo_database: str) -> None:
    """The production shape: the stream (gzip) through a TLS front to the simulator, MongoDB
    through another to the stand-in, both verified against a private CA (``stream.ca_file``,
    ``tlsCAFile``). A scripted close: the reconnect makes a new TLS handshake, and every tweet of
    the simulator's ground truth is stored once."""
    script = [[{"deliver": 30}, {"close": True}], [{"deliver": 30}, {"keepalive_only": 60}]]
    sim = SimProcess(tmp_path / "sim", "--behind-tls", "--rate", "200", "--control-every", "0",
                     script=script).start()
    good = (certs.chain("good"), certs.key("good"))
    try:
        with (TlsFront(*good, upstream=("127.0.0.1", sim.port)) as stream_front,
              TlsFront(*good, upstream=mongo_address(mongo_uri)) as mongo_front):
            uri = (f"mongodb://127.0.0.1:{mongo_front.port}/?tls=true&tlsCAFile={certs.ca}"
                   "&directConnection=true")
            doc = settings_doc(stream_url(stream_front.port), uri, mongo_database)
            doc["stream"]["ca_file"] = str(certs.ca)
            daemon = Daemon(tmp_path / "daemon", doc)
            try:
                daemon.start().wait_ready()
                def all_stored() -> set[int] | None:
                    truth = set(sim.ground_truth().tweet_ids())
                    got = set(stored_ids(mongo_uri, mongo_database))
                    return truth if len(truth) == 60 and truth <= got else None
                truth = wait_until(all_stored, 60, "all 60 tweets stored")
                code, _ = daemon.stop()
            finally:
                daemon.kill()
    finally:
        sim.stop()
    assert code == 0, daemon.tail()
    ids = stored_ids(mongo_uri, mongo_database)
    assert sorted(ids) == sorted(truth)  # each once
    assert [c["status"] for c in sim.ground_truth().connections()] == [200, 200]
    assert stream_front.handshakes == 2 and stream_front.failed == 0
    connected = daemon.events("connected")
    assert [e["conn"] for e in connected] == [1, 2] and all(e["gzip"] for e in connected)
    assert all(e["ending"] == "closed" for e in daemon.events("stream_ended"))
    no_secret_in(daemon.logs())


def test_a_tls_handshake_that_never_answers_is_ended_by_the_connect_timeout(
        tmp_path: Path, mongo_uri: str) -> None:
    """A server that accepts TCP and never answers the ClientHello: ``stream.connect_timeout``
    ends each attempt (not ``read_timeout``, 90 s here), the daemon retries, and SIGTERM in the
    middle of a handshake stops it within ``control.stop_timeout``."""
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def hold() -> None:
            with contextlib.suppress(OSError):
                while True:
                    held.append(listener.accept()[0])  # accepted, never answered
        threading.Thread(target=hold, daemon=True).start()
        doc = settings_doc(stream_url(listener.getsockname()[1]), mongo_uri, "tls_stall")
        doc["stream"]["connect_timeout"] = 1
        daemon = Daemon(tmp_path / "daemon", doc)
        try:
            daemon.start().wait_ready()
            second = daemon.wait_log("stream_ended", conn=2, timeout=20)
            daemon.wait_log("connecting", conn=3, timeout=20)  # in its handshake now
            code, took = daemon.stop()
        finally:
            daemon.kill()
            for sock in held:
                sock.close()
    assert code == 0, daemon.tail()
    assert took < doc["control"]["stop_timeout"], took
    assert second["ending"] == "network" and "timed out" in second["reason"], second
    first = daemon.events("stream_ended", conn=1)[0]
    assert first["backoff"] > 0, first


V2_PATH = "/2/tweets/search/stream"
V2_TOKEN = {"TWITTER_BEARER_TOKEN": "AAAAAAAAAAAAAAAAAAAAAtls-v2-token-ingestd-tests"}
# certificate served -> (words of the cause, the setting it names), as the stream says them
RULES_CAUSES = {
    "self": ("not signed by a trusted CA (self-signed", "set stream.ca_file"),
    "expired": STREAM_CAUSES["expired"],
    "wrong_host": STREAM_CAUSES["wrong_host"],
}


@pytest.mark.parametrize("kind", list(RULES_CAUSES))
def test_the_v2_rules_client_names_the_certificate_problem(
        tmp_path: Path, kind: str, certs: Certs, mongo_uri: str) -> None:
    """v2's rules calls behind a TLS front (the simulator ``--behind-tls``) whose certificate is
    self-signed, expired or another host's: the rules client logged OpenSSL's bare text ("SSL
    certificate problem: …"), while the stream's reason named the cause and stream.ca_file."""
    sim = SimProcess(tmp_path / "sim", "--behind-tls", "--api", "v2", "--keepalive", "1",
                     env=V2_TOKEN).start()
    cert = (certs.leaf("self"), certs.key("self")) if kind == "self" else served(certs, kind)
    try:
        with TlsFront(*cert, upstream=("127.0.0.1", sim.port)) as front:
            doc = settings_doc(f"https://127.0.0.1:{front.port}{V2_PATH}", mongo_uri, "tls_v2")
            del doc["stream"]["track"]
            doc["stream"].update({"api": "v2", "ca_file": str(certs.ca),
                                  "rules": [{"value": "coffee", "tag": "drinks"}]})
            doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
            daemon = Daemon(tmp_path / "daemon", doc)
            try:
                daemon.start(extra_env=V2_TOKEN).wait_ready()
                retry = daemon.wait_log("rules_sync_retry", generation=1)
                code, _ = daemon.stop()
            finally:
                daemon.kill()
    finally:
        sim.stop()
    assert code == 0, daemon.tail()
    cause, setting = RULES_CAUSES[kind]
    text = retry["error"]
    assert text.startswith("rules endpoint unreachable: "), text
    assert cause in text and setting in text and "curl error 60" in text, text
    assert V2_TOKEN["TWITTER_BEARER_TOKEN"] not in daemon.logs()
