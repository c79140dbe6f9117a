"""``ingestd check``: validate settings; with ``--online`` also test MongoDB and the endpoint.

Used by the systemd unit's ExecStartPre/ExecReload, so a broken settings file makes
``systemctl reload`` fail visibly instead of being discovered by the running daemon.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pycurl

from ingestd.config.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, ConfigError
from ingestd.config.schema import Rule, Settings, StreamSettings
from ingestd.config.settings import load_settings, secret_values
from ingestd.config.stream import ca_bundle
from ingestd.config.tls import HOST_MONGO, TRUST_MONGO, certificate_problem
from ingestd.control import statedir
from ingestd.logs import register_secret, scrub_text
from ingestd.source.curl_errors import tls_hint
from ingestd.source.headers import USER_AGENT, ResponseHead
from ingestd.source.oauth import diagnose_401, encode_form, sign_request
from ingestd.source.request import post_params
from ingestd.source.transport import configure_transport
from ingestd.source.v2_rules_client import RulesClient, RulesError, ServerRule
from ingestd.tools.instances import instance_warnings

if TYPE_CHECKING:
    from pymongo import MongoClient

PROBE_SECONDS = 10
MONGO_CAUSES = (  # after a failed certificate check (config.tls names its cause)
    ("connection refused", "nothing listens at that address (connection refused): is mongod "
                           "running, and is the port right?"),
    ("name or service not known", "the host name does not resolve (DNS)"),
    ("nodename nor servname", "the host name does not resolve (DNS)"),
    ("timed out", "no answer (timed out): a firewall, or the wrong host"),
)
CURL_ERRORS = {
    6: "the host name does not resolve (DNS)",
    7: "nothing listens at that address (connection refused), or the network is unreachable",
    28: f"no answer within {PROBE_SECONDS}s (timed out)",
}


def run_check(config: Path, *, online: bool) -> int:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    for secret in secret_values(settings):
        register_secret(secret)  # scrub_text then masks them in any error text we print
    state_error, state_warnings = state_dir_findings(settings)
    if state_error:
        print(f"invalid settings:\n{state_error}", file=sys.stderr)
        return EXIT_CONFIG
    print(summary(settings))
    for notice in (*settings.mongo.notices, *state_warnings, *spool_size_warnings(settings),
                   *instance_warnings(settings)):
        print(f"warning: {notice}")
    if not online:
        return 0
    mongo_ok = check_mongo(settings)
    return 0 if check_endpoint(settings, mongo_ok=mongo_ok) and mongo_ok else EXIT_UNAVAILABLE


def state_dir_findings(settings: Settings) -> tuple[str, list[str]]:
    """(an error, warnings) about the state folder, found by looking only (nothing is created).

    An error when no user could use it (a path component that is a file, a read-only file
    system); a warning when only the user running ``check`` cannot write it: the daemon may run
    as another (systemd's DynamicUser).
    """
    found = statedir.inspect(settings.state_dir)
    if found is None:
        return "", []
    text = f"{settings.path}: state_dir: {settings.state_dir} cannot be used: {found.reason}"
    if found.anyone:
        return text, []
    return "", [f"{text} (by this user; the daemon's user may differ)"]


def spool_size_warnings(settings: Settings) -> list[str]:
    """A warning per spool bound the state folder's file system is too small for (statvfs of
    the spool folder, or of its nearest existing parent: ``check`` creates nothing).

    Not an error: the daemon copes (a full disk rolls to a new segment, then applies
    ``spool.when_full``; docs/reliability.md), but ``spool.max_bytes`` is then never what stops
    the spool, and the file system's own limit comes first."""
    spool = settings.state_dir / "spool"
    where = next((p for p in (spool, *spool.parents) if p.exists()), None)
    if where is None:
        return []
    try:
        st = os.statvfs(where)
    except OSError:
        return []
    size = st.f_blocks * st.f_frsize
    if size <= 0:
        return []
    warnings = []
    for key, value, effect in (
            ("segment_bytes", settings.spool.segment_bytes,
             "a segment ends when the disk fills up instead"),
            ("max_bytes", settings.spool.max_bytes,
             "the disk fills up before this bound (spool.when_full then applies to the disk "
             "errors, counted as disk_error)")):
        if value > size:
            warnings.append(
                f"{settings.path}: spool.{key}: {value} bytes ({_mib(value)}) cannot fit the "
                f"file system of the state folder ({where}: {size} bytes, {_mib(size)}); "
                f"{effect}")
    return warnings


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def summary(settings: Settings) -> str:
    s = settings.stream
    return (f"settings OK: {settings.path}\n"
            f"  endpoint   {s.url}\n"
            f"  filters    {_filters(s)}\n"
            f"  mongo      {settings.mongo.database}.{settings.mongo.collection}\n"
            f"  state dir  {settings.state_dir}{_ha_line(settings)}")


def _filters(s: StreamSettings) -> str:
    if s.api == "v2":  # v2 filters by the rules held on the server (docs/protocol.md §7.3)
        return f"{len(s.rules)} rules (v2; synced to the rules endpoint at start and reload)"
    return (f"{len(s.track)} track phrases, {len(s.follow)} follow ids, "
            f"{len(s.locations)} location boxes")


def _ha_line(settings: Settings) -> str:
    """A standby pair must share one lease document: what decides which one (see the alert
    IngestdStandbyBothActive)."""
    ha = settings.ha
    if ha.mode != "standby":
        return f"\n  ha         {ha.mode}" if ha.mode != "single" else ""
    return (f"\n  ha         standby as {ha.instance}, lease {ha.lease_key} in "
            f"{settings.mongo.database}.{ha.collection} at {settings.mongo.display_uri()}")


def check_mongo(settings: Settings) -> bool:
    """Ping MongoDB (which also authenticates, if the URI has credentials), then ``hello``."""
    from ingestd.sink.mongo import make_client

    client = make_client(settings.mongo)
    try:
        client.admin.command("ping")
        hello = server_hello(client)
        status = connection_status(client)
    except Exception as exc:  # any driver error is a finding to report, not a crash
        print(f"mongo      FAILED: {explain_mongo_error(exc, settings)}")
        return False
    finally:
        client.close()
    print(f"mongo      reachable (ping ok) at {settings.mongo.display_uri()}")
    report_deployment(hello, settings)
    return report_privileges(status, settings)


def connection_status(client: MongoClient[dict[str, Any]]) -> Mapping[str, object]:
    """``connectionStatus`` with the user's privileges; {} from a server that refuses it."""
    from pymongo.errors import OperationFailure

    try:
        return client.admin.command("connectionStatus", showPrivileges=True)
    except OperationFailure:
        return {}


def report_privileges(status: Mapping[str, object], settings: Settings) -> bool:
    """The privileges the daemon needs that the user lacks: a failure for those it cannot store
    without, a warning for the indexes' (a ping needs none: it proves nothing about them)."""
    from ingestd.tools.mongo_privileges import lacking, users

    who = users(status)
    if not who:
        print("mongo      privileges not checked: no user authenticated (a server without "
              "access control allows everything)")
        return True
    lacks = lacking(status, settings)
    if not lacks:
        print(f"mongo      privileges ok for {', '.join(who)}")
        return True
    for lack in lacks:
        if lack.blocking:
            print(f"mongo      FAILED: {lack.describe()}")
        else:
            print(f"warning: {settings.path}: mongo.uri: {lack.describe()}")
    print("mongo      grant the user readWrite on the database (or a role with these actions)")
    return not any(lack.blocking for lack in lacks)


def server_hello(client: MongoClient[dict[str, Any]]) -> Mapping[str, object]:
    """``hello``, or ``isMaster`` from a server older than 4.4.2 (CommandNotFound, 59)."""
    from pymongo.errors import OperationFailure

    try:
        return client.admin.command("hello")
    except OperationFailure as exc:
        if exc.code != 59:
            raise
        return client.admin.command("isMaster")


def report_deployment(hello: Mapping[str, object], settings: Settings) -> None:
    """The deployment type, the write concern, and a warning per way it can lose a write there.

    Warnings, not failures: ``w: 1`` can be a deliberate choice (exit status stays 0).
    """
    from ingestd.tools.mongo_deployment import describe, write_concern_risks

    where = describe(hello)
    wc = settings.mongo.write_concern
    print(f"mongo      deployment: {where.describe()}")
    print(f"mongo      write concern w={wc.w} j={str(wc.j).lower()}")
    for key, why in write_concern_risks(wc, where):
        print(f"warning: {settings.path}: mongo.write_concern.{key}: {why}")


def explain_mongo_error(exc: BaseException, settings: Settings) -> str:
    """A driver error in plain words; the driver's own text (scrubbed) follows as detail."""
    from pymongo.errors import ConfigurationError, ConnectionFailure, OperationFailure

    detail = scrub_text(str(exc))[:300]
    where = settings.mongo.display_uri()
    code = getattr(exc, "code", None)
    if isinstance(exc, OperationFailure) and code == 18:
        return ("MongoDB rejected the user name or password in mongo.uri (authentication "
                f"failed) at {where}")
    if isinstance(exc, OperationFailure) and code == 13:
        return f"the MongoDB user is not allowed to do this (unauthorized) at {where}"
    if isinstance(exc, ConfigurationError):
        return f"mongo.uri or its options are not usable: {detail}"
    if isinstance(exc, ConnectionFailure):
        # pymongo appends its timeouts and topology dump: the first clause is the finding.
        first = re.split(r" \(configured timeouts|, Timeout: ", detail, maxsplit=1)[0]
        return f"MongoDB is not reachable at {where}: {_why(first)}"
    return f"{type(exc).__name__}: {detail}"


def _why(detail: str) -> str:
    """The likely cause behind a driver's connection error text."""
    text = detail.lower()
    if tls := certificate_problem(detail, TRUST_MONGO, HOST_MONGO, verify_failed=False):
        return f"{tls} ({detail[:300]})"
    for needle, cause in MONGO_CAUSES:
        if needle in text:
            return f"{cause} ({detail[:200]})"
    return detail


def check_endpoint(settings: Settings, *, mongo_ok: bool = True) -> bool:
    """v2: the rules endpoint (no stream is opened). v1.1: a real stream connection, unless a
    running stream on these settings would be logged out by it (docs/protocol.md §3)."""
    if settings.stream.api == "v2":
        return check_rules(settings)
    if why := stream_in_use(settings, mongo_ok=mongo_ok):
        print(f"endpoint   probe skipped: {why}. A probe is a real stream connection, and a "
              "second one on these credentials logs the running stream out (disconnect code "
              "7). The settings were validated and MongoDB checked (above); the endpoint and "
              "credentials were not tested")
        return True
    return probe_stream(settings)


def stream_in_use(settings: Settings, *, mongo_ok: bool) -> str:
    """Why a stream on these settings may be running ("" if none is known to be)."""
    from ingestd.tools.stream_in_use import lease_holder, state_dir_holder

    if why := state_dir_holder(settings.state_dir):
        return why
    if settings.ha.mode != "standby":
        return ""
    if not mongo_ok:
        return "the standby lease could not be read (MongoDB failed above)"
    return lease_holder(settings)


def check_rules(settings: Settings) -> bool:
    """``GET`` the v2 rules: proves the endpoint answers and the bearer token is accepted, without
    opening a stream (a second stream would be refused, or take an active one's place)."""
    client = RulesClient(settings.stream, settings.auth)
    try:
        held = client.current()
    except RulesError as exc:
        text = scrub_text("; ".join(exc.messages))[:300]
        if exc.status in (401, 403):  # the messages already say "HTTP <status>: …"
            print(f"endpoint   FAILED: token rejected: check auth.bearer_token ({text}; "
                  f"{client.url})")
        else:
            print(f"endpoint   FAILED: {text} ({client.url})")
        return False
    print("endpoint   rules endpoint answered (HTTP 200), bearer token accepted (no stream "
          "opened)")
    print(f"rules      {rules_comparison(settings.stream.rules, held)}")
    return True


def rules_comparison(configured: Sequence[Rule], held: Sequence[ServerRule]) -> str:
    want = {(r.value, r.tag) for r in configured}
    have = {r.key() for r in held}
    text = f"{len(configured)} configured, {len(held)} on the server"
    if want == have:
        return f"{text}: the same"
    return (f"{text}: {len(want - have)} to add, {len(have - want)} to delete at the "
            "daemon's next start or reload")


def probe_stream(settings: Settings) -> bool:
    """One signed request; reports the status and, for a 401, whether the clock is to blame."""
    s = settings.stream
    body = encode_form(post_params(s))
    headers = sign_request(s.url, body, settings.auth)
    headers["User-Agent"] = USER_AGENT
    head = ResponseHead()  # its take skips junk lines: no traceback from the callback
    seen = bytearray()

    def on_data(data: bytes) -> int | None:
        seen.extend(data[:4096])
        return 0 if head.status == 200 and seen.strip() else None  # enough: stop reading

    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, s.url)
    curl.setopt(pycurl.POSTFIELDS, body)
    curl.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()])
    curl.setopt(pycurl.HEADERFUNCTION, head.take)
    curl.setopt(pycurl.WRITEFUNCTION, on_data)
    configure_transport(curl, s.url, ca_bundle(s))  # as the daemon's: TLS verified, proxy policy
    curl.setopt(pycurl.TIMEOUT, PROBE_SECONDS)
    curl.setopt(pycurl.NOSIGNAL, 1)
    if s.gzip:
        curl.setopt(pycurl.ACCEPT_ENCODING, "deflate, gzip")
    try:
        curl.perform()
    except pycurl.error as exc:
        code = exc.args[0]
        if malformed := head.refused_by_curl(code, str(exc.args[1])):
            print(f"endpoint   FAILED: {scrub_text(malformed)} ({s.url})")
            return False
        if head.status == 200 and code in (23, 28):
            pass  # we stopped reading (23) or the stream was quiet (28): it answered 200
        else:
            text = str(exc.args[1])
            why = tls_hint(code, text) or CURL_ERRORS.get(code) or scrub_text(text)
            print(f"endpoint   FAILED: {why} (curl error {code}, {s.url})")
            return False
    finally:
        curl.close()
    return report_status(head.status, bytes(seen), head.headers.get("date"))


def report_status(status: int, body: bytes, date: str | None) -> bool:
    if status == 200:
        print("endpoint   connected (HTTP 200), credentials and filters accepted")
        return True
    text = scrub_text(body.decode("utf-8", "replace").strip()[:300])
    print(f"endpoint   FAILED: HTTP {status}: {text}")
    if status == 401:
        print(f"           {diagnose_401(date, time.time())}")
    return False
