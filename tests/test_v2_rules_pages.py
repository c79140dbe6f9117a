"""X API v2 rules lists of more than one page (docs/protocol.md §7.3): ``GET …/rules`` answers
1,000 rules at most, with ``meta.next_token`` while more remain.

The client read the first page only: with more than 1,000 rules the sync added the rules past it
again (DuplicateRule: the sync was refused) and never deleted an unconfigured one there, and
``ingestd check --online`` counted 1,000 rules on the server.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.config.errors import Secret
from ingestd.config.schema import AuthSettings, Rule, StreamSettings
from ingestd.source import v2_rules_client
from ingestd.source.v2_rules_client import RulesClient, RulesError
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.raw_endpoint import RawEndpoint
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

TOKEN = "AAAAAAAAAAAAAAAAAAAAAv2-rules-pages-token"
ENV = {"TWITTER_BEARER_TOKEN": TOKEN}
RULES_PATH = "/2/tweets/search/stream/rules"


def base(sim: SimProcess) -> str:
    return f"http://127.0.0.1:{sim.port}"


def client_for(base: str) -> RulesClient:
    """A rules client for the stream at ``base`` (``http://127.0.0.1:port``)."""
    stream = StreamSettings(url=f"{base}/2/tweets/search/stream", api="v2")
    blank = Secret("")
    return RulesClient(stream, AuthSettings(blank, blank, blank, blank, Secret(TOKEN)))


# ---------------------------------------------------------------- the simulator's pages


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimProcess]:
    proc = SimProcess(tmp_path / "sim", "--api", "v2", "--rate", "5", "--keepalive", "1",
                      "--max-rules", "3000", env=ENV).start()
    try:
        yield proc
    finally:
        proc.stop()


def get_rules(sim: SimProcess, query: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        conn.request("GET", f"{RULES_PATH}?{query}", headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def keys(rules: list[Rule]) -> list[tuple[str, str | None]]:
    return [(r.value, r.tag) for r in rules]


def words(prefix: str, count: int, start: int = 0) -> list[Rule]:
    return [Rule(f"{prefix}{i:05d}", f"t{i % 7}") for i in range(start, start + count)]


@pytest.mark.parametrize("size", ["0", "1001", "-1", "ten", "", "9" * 5000])
def test_the_simulator_refuses_max_results_outside_1_to_1000(sim: SimProcess, size: str) -> None:
    status, body = get_rules(sim, f"max_results={size}")
    assert status == 400
    assert body["title"] == "Invalid Request"
    assert body["errors"][0]["parameters"] == {"max_results": [size]}
    assert "is not between 1 and 1000" in body["errors"][0]["message"]


def test_the_simulator_pages_by_id_and_refuses_a_foreign_token(sim: SimProcess) -> None:
    client_for(base(sim)).add(words("kw", 5))
    status, first = get_rules(sim, "max_results=2")
    assert status == 200 and first["meta"]["result_count"] == 2
    token = first["meta"]["next_token"]
    client_for(base(sim)).delete([first["data"][1]["id"]])  # a change while paging
    _, second = get_rules(sim, f"max_results=2&pagination_token={token}")
    _, third = get_rules(sim, f"max_results=2&pagination_token={second['meta']['next_token']}")
    seen = [r["value"] for page in (first, second, third) for r in page["data"]]
    assert seen == ["kw00000", "kw00001", "kw00002", "kw00003", "kw00004"]  # none shifted
    assert "next_token" not in third["meta"] and third["meta"]["result_count"] == 1
    status, _ = get_rules(sim, "pagination_token=not-a-token")
    assert status == 400


def test_the_client_reads_every_page(sim: SimProcess) -> None:
    rules = words("kw", 2500)
    client_for(base(sim)).add(rules)
    _, default = get_rules(sim, "")
    assert default["meta"]["result_count"] == 1000 and "next_token" in default["meta"]
    held = client_for(base(sim)).current()
    assert [r.key() for r in held] == keys(rules)  # three pages, in order, once


# ---------------------------------------------------------------- the client's bounds


def json_page(client: socket.socket, body: dict[str, Any], remaining: int = 7) -> None:
    raw = json.dumps(body).encode()
    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                   b"x-rate-limit-remaining: %d\r\nConnection: close\r\n\r\n%s"
                   % (len(raw), remaining, raw))


def page_of(rule_id: int, token: object = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"result_count": 1}
    if token is not None:
        meta["next_token"] = token
    return {"data": [{"id": str(rule_id), "value": f"kw{rule_id}"}], "meta": meta}


def base_of(endpoint: RawEndpoint) -> str:
    return endpoint.url.removesuffix("/1.1/statuses/filter.json")


def test_the_client_follows_next_token_and_keeps_each_pages_rate_limit() -> None:
    def page(n: int, token: str | None) -> Any:
        return lambda c, _r, _s: json_page(c, page_of(n, token), remaining=100 - n)

    with RawEndpoint([page(1, "a b/c"), page(2, "second"), page(3, "")]) as endpoint:
        client = client_for(base_of(endpoint))
        held = client.current()
    assert [r.id for r in held] == ["1", "2", "3"]  # an empty next_token ends the list
    lines = [r.partition(b"\r\n")[0].decode() for r in endpoint.requests]
    assert lines == [f"GET {RULES_PATH}?max_results=1000 HTTP/1.1",
                     f"GET {RULES_PATH}?max_results=1000&pagination_token=a%20b%2Fc HTTP/1.1",
                     f"GET {RULES_PATH}?max_results=1000&pagination_token=second HTTP/1.1"]
    assert client.last_rate_limit == {"x-rate-limit-remaining": "97"}


def test_a_server_whose_pages_never_end_is_an_error_after_the_bound() -> None:
    def endless(client: socket.socket, _: bytes, __: threading.Event) -> None:
        n = len(endpoint.requests)  # this request's number: a new rule and token each time
        json_page(client, page_of(n, f"page{n}"))

    bound = v2_rules_client.MAX_PAGES
    with RawEndpoint([endless]) as endpoint, pytest.raises(RulesError) as info:
        client_for(base_of(endpoint)).current()
    assert len(endpoint.requests) == bound
    assert info.value.messages == [f"rules list: still a next_token after {bound} pages "
                                   f"({bound} rules); the list cannot be read"]
    assert not info.value.transient


def test_a_repeated_next_token_is_an_error() -> None:
    same = [lambda c, _r, _s: json_page(c, page_of(1, "again"))]
    twice = pytest.raises(RulesError, match="sent next_token 'again' twice")
    with RawEndpoint(same) as endpoint, twice:
        client_for(base_of(endpoint)).current()
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize(("token", "reason"), [
    (7, "not text but 7"),
    (["a"], "not text but <list>"),
    ({"next": "a"}, "not text but <dict>"),
    ("x" * 3000, "next_token of 3,000 characters"),
])
def test_a_next_token_of_another_shape_is_a_rules_error(token: object, reason: str) -> None:
    answer = [lambda c, _r, _s: json_page(c, page_of(1, token))]
    with RawEndpoint(answer) as endpoint, pytest.raises(RulesError, match=reason):
        client_for(base_of(endpoint)).current()
    assert len(endpoint.requests) == 1


def test_an_answer_over_the_cap_says_so_not_unreachable() -> None:
    cap = v2_rules_client.MAX_BODY

    def huge(client: socket.socket, _: bytes, __: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % (cap + (1 << 20)))
        block = b" " * (1 << 16)
        for _ in range((cap >> 16) + 16):  # until the client hangs up (OSError)
            client.sendall(block)

    with RawEndpoint([huge]) as endpoint, pytest.raises(RulesError) as info:
        client_for(base_of(endpoint)).current()
    assert info.value.messages == [f"rules answer larger than {cap >> 20} MiB (HTTP 200): "
                                   "not read"]


# ---------------------------------------------------------------- the daemon's sync


def test_the_daemon_syncs_against_every_page_of_the_servers_rules(
    sim: SimProcess, tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """2,100 configured rules; the server holds 2,050 of them and a stale one, on page 2. The
    sync deletes the stale one and adds the 50 missing, nothing else (no DuplicateRule)."""
    configured = words("kw", 2100)
    seeding = client_for(base(sim))
    seeding.add(configured[:1500])
    seeding.add([Rule("stalerule", "old")])  # the 1,501st: on page 2
    seeding.add(configured[1500:2050])  # pages 2 and 3, kept
    seeded = len(sim.ground_truth().of("rules"))

    doc = settings_doc(f"{base(sim)}/2/tweets/search/stream", mongo_uri, mongo_database)
    del doc["stream"]["track"]
    doc["stream"].update({"api": "v2", "read_timeout": 10,
                          "rules": [{"value": r.value, "tag": r.tag} for r in configured]})
    doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
    daemon = Daemon(tmp_path / "daemon", doc).start(extra_env=ENV)
    try:
        daemon.wait_ready()
        outcome = wait_until(lambda: rules_outcome(daemon), 60, "the first rules sync")
        assert outcome["event"] == "rules_synced", str(outcome.get("errors"))[:300]
        in_force = wait_until(lambda: (daemon.status("stream").get("rules") or {})
                              .get("in_force"), 30, "the rules in force in the status")
        held = client_for(base(sim)).current()
    finally:
        finish(daemon, sim)
    assert outcome["deleted"] == ["stalerule [old]"]
    assert outcome["added"] == [f"{r.value} [{r.tag}]" for r in configured[2050:]]
    assert outcome["unchanged"] == 2050
    changes = sim.ground_truth().of("rules")[seeded:]
    assert [(e["op"], len(e["rules"])) for e in changes] == [("delete", 1), ("add", 50)]
    assert sorted(r.key() for r in held) == sorted(keys(configured))
    assert len(in_force) == 2100
    assert not daemon.events("rules_rejected") and not daemon.events("rules_sync_retry")


def rules_outcome(daemon: Daemon) -> dict[str, Any] | None:
    """The first sync's end: synced or rejected (the first page alone was refused)."""
    daemon.assert_running()
    ends = [e for e in daemon.log_events() if e.get("generation") == 1
            and e.get("event") in ("rules_synced", "rules_rejected")]
    return ends[0] if ends else None
