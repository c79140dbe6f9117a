"""Proxy environment variables: a loopback endpoint is never reached through a proxy.

The secrets audit: with ``stream.url`` on loopback (plain http allowed) and ``http_proxy`` in the
environment, libcurl sent the OAuth-signed request in clear text to the proxy, off the host. Here
the proxy variables name a listener on another loopback address that records every connection:
the daemon, ``check --online`` and the v2 rules client must stream without it ever seeing one. An
https endpoint still goes through the proxy (a CONNECT tunnel, TLS end to end): operators behind
a corporate proxy need that.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestd.source.transport import uses_no_proxy
from tests.support.creds import CREDS
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

PROXY_HOST = "127.0.0.2"  # not the endpoint's address: a connection here went to the "proxy"
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")
BEARER = "AAAAAAAAAAAAAAAAAAAAAproxy-test-token"


class ProxyTrap:
    """A listener that records the first bytes of every connection made to it, then hangs up."""

    def __init__(self) -> None:
        self.sock = socket.create_server((PROXY_HOST, 0))
        self.seen: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{PROXY_HOST}:{self.sock.getsockname()[1]}"

    def env(self) -> dict[str, str]:
        """Every proxy variable libcurl reads, naming this listener."""
        names = ("http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
        return dict.fromkeys(names, self.url)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5)
                try:
                    first = conn.recv(4096)
                except OSError:
                    first = b""
                self.seen.append(first or b"<connected, sent nothing>")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def trap() -> Iterator[ProxyTrap]:
    listener = ProxyTrap()
    yield listener
    listener.close()


def proxied_env(trap: ProxyTrap, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NO_PROXY_VARS}
    return {**env, **CREDS, **trap.env(), **(extra or {})}


def check_online(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", "check", "--online", "--config",
                           str(config)], capture_output=True, text=True, timeout=60, env=env)


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.setdefault("state_dir", str(path.parent / "state"))
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(("url", "direct"), [
    ("http://127.0.0.1:8080/1.1/statuses/filter.json", True),
    ("http://localhost/x", True), ("https://[::1]:8443/x", True), ("http://127.9.9.9/x", True),
    ("https://stream.twitter.com/1.1/statuses/filter.json", False),
    ("https://10.0.0.1/x", False),
])
def test_only_a_loopback_endpoint_bypasses_the_proxy(url: str, direct: bool) -> None:
    assert uses_no_proxy(url) is direct


def test_check_online_reaches_a_loopback_endpoint_directly(
        tmp_path: Path, trap: ProxyTrap, mongo_uri: str) -> None:
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "0.5").start()
    try:
        config = write(tmp_path / "settings.yaml", settings_doc(sim.url, mongo_uri, "proxy"))
        result = check_online(config, proxied_env(trap))
    finally:
        sim.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "endpoint   connected (HTTP 200)" in result.stdout
    assert trap.seen == []


def test_check_online_v2_rules_call_reaches_a_loopback_endpoint_directly(
        tmp_path: Path, trap: ProxyTrap, mongo_uri: str) -> None:
    sim = SimProcess(tmp_path / "sim", "--keepalive", "1",
                     env={"TWITTER_BEARER_TOKEN": BEARER}).start()
    try:
        config = write(tmp_path / "settings.yaml", v2_doc(sim, mongo_uri))
        result = check_online(config, proxied_env(trap, {"TWITTER_BEARER_TOKEN": BEARER}))
    finally:
        sim.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bearer token accepted" in result.stdout
    assert trap.seen == []


def v2_doc(sim: SimProcess, mongo_uri: str) -> dict[str, Any]:
    doc = settings_doc(f"http://127.0.0.1:{sim.port}/2/tweets/search/stream", mongo_uri,
                       "proxy_v2")
    del doc["stream"]["track"]
    doc["stream"].update({"api": "v2", "rules": [{"value": "coffee OR music", "tag": "d"}]})
    doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
    return doc


class ProxiedDaemon(Daemon):
    """The daemon with every proxy variable naming the trap, and no NO_PROXY."""

    def __init__(self, workdir: Path, doc: dict[str, Any], env: dict[str, str]) -> None:
        super().__init__(workdir, doc)
        self._env = env

    def env(self) -> dict[str, str]:
        return {k: v for k, v in super().env().items() if k not in NO_PROXY_VARS} | self._env


def test_the_daemon_streams_from_a_loopback_endpoint_without_the_proxy(
        tmp_path: Path, trap: ProxyTrap, mongo_uri: str, mongo_database: str) -> None:
    """v2: the rules sync (its own handles) and the stream connection, in the real daemon."""
    sim = SimProcess(tmp_path / "sim", "--rate", "200", "--keepalive", "0.5",
                     env={"TWITTER_BEARER_TOKEN": BEARER}).start()
    daemon = ProxiedDaemon(tmp_path / "daemon", v2_doc(sim, mongo_uri),
                           {**trap.env(), "TWITTER_BEARER_TOKEN": BEARER})
    try:
        daemon.start().wait_ready()
        daemon.wait_log("rules_synced", generation=1)  # the rules calls went through
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 20, 60,
                   "tweets stored from the stream")
    finally:
        finish(daemon, sim)
    assert trap.seen == []


def test_an_https_endpoint_still_goes_through_the_proxy(
        tmp_path: Path, trap: ProxyTrap, mongo_uri: str) -> None:
    """Documented (README, "Proxies"): https honours the proxy variables, through CONNECT."""
    doc = settings_doc("https://stream.example.invalid/1.1/statuses/filter.json", mongo_uri,
                       "proxy_https")
    result = check_online(write(tmp_path / "settings.yaml", doc), proxied_env(trap))
    assert result.returncode != 0  # the trap is no proxy
    assert [s.split(b"\r\n")[0] for s in trap.seen] == [
        b"CONNECT stream.example.invalid:443 HTTP/1.1"], trap.seen
    assert b"OAuth" not in b"".join(trap.seen)  # the signed request never left the tunnel
