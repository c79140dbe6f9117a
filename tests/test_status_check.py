"""``ingestd status`` and ``ingestd check``, run as real processes.

status: against a running daemon and with none. check: offline validation, and ``--online``
against the simulator (good credentials, wrong credentials, a skewed client clock), an
unreachable MongoDB, and a TLS endpoint whose certificate no trusted CA signed.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestd.config.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, ConfigError
from tests.support.creds import CREDS
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.simulator import SimProcess
from tests.support.skips import unavailable
from tests.support.wait import wait_until

SKEW = 300  # seconds the client clock is set ahead in the clock test


def ingestd(*args: str, env: dict[str, str] | None = None,
            prelude: str = "") -> subprocess.CompletedProcess[str]:
    """Run the real CLI; ``prelude`` is Python run first in that process (e.g. to skew time)."""
    code = f"{prelude}\nfrom ingestd.cli import main\nraise SystemExit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**_base_env(), **(env or {})})


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")} | {
        k: v for k, v in CREDS.items() if k not in os.environ}


def write_settings(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.setdefault("state_dir", str(path.parent / "state"))
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- status ---------------------------------------------------------------------------------------


def test_status_with_no_daemon_running(tmp_path: Path, mongo_uri: str) -> None:
    config = write_settings(tmp_path / "settings.yaml", settings_doc(
        "http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "unused"))
    text = ingestd("status", "--config", str(config))
    as_json = ingestd("status", "--config", str(config), "--json")

    assert text.returncode == 3, text
    assert "ingestd: down" in text.stdout
    assert "stream worker not running" in text.stdout
    view = json.loads(as_json.stdout)
    assert as_json.returncode == 3
    assert view["health"] == "down" and view["exit_code"] == 3
    assert view["running"] == {"supervisor": False, "stream": False, "store": False}


def test_status_of_a_running_daemon(tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = SimProcess(tmp_path / "sim", "--rate", "200", "--max-tweets", "40",
                     "--keepalive", "0.5", "--seed", "5").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        # 40 tweets sent: stored, or skipped when their delete arrived first.
        wait_until(lambda: (c := daemon.counters("store")).get("stored", 0)
                   + sum(c.get("skipped", {}).values()) >= 40, 60, "40 tweets")
        # The supervisor's own file is written once it saw both workers: status reads it too.
        wait_until(lambda: daemon.status("supervisor").get("state") == "ready", 30, "ready")
        text = ingestd("status", "--config", str(daemon.config))
        as_json = ingestd("status", "--config", str(daemon.config), "--json")
        addr = (daemon.state_dir / "run" / "metrics.addr").read_text().strip()
        assert daemon.stop()[0] == 0
    finally:
        daemon.kill()
        sim.stop()
    after = ingestd("status", "--config", str(daemon.config))
    print("\n" + text.stdout)

    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.startswith("ingestd: ok")
    assert re.search(r"stream +pid \d+ up +connected conn=1 gen=1", text.stdout)
    stored = daemon.counters("store")["stored"]
    assert f"stored {stored}" in text.stdout
    assert f"http://{addr}/metrics" in text.stdout
    view = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and view["health"] == "ok" and view["reasons"] == []
    assert view["workers"]["store"]["counters"]["stored"] == stored
    assert view["metrics"] == addr
    assert after.returncode == 3 and "down" in after.stdout


# -- check ----------------------------------------------------------------------------------------


def test_check_valid_settings(tmp_path: Path, mongo_uri: str) -> None:
    config = write_settings(tmp_path / "settings.yaml", settings_doc(
        "http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "analytics"))
    result = ingestd("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "settings OK" in result.stdout and "analytics.tweets" in result.stdout
    assert "  ha " not in result.stdout  # single: nothing to say


def test_check_names_a_standby_s_lease_document(tmp_path: Path, mongo_uri: str) -> None:
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "analytics")
    doc["ha"] = {"mode": "standby", "instance": "db-1", "collection": "pairs"}
    result = ingestd("check", "--config", str(write_settings(tmp_path / "s.yaml", doc)))
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("  ha ")]
    assert re.fullmatch(r"  ha +standby as db-1, lease stream:[0-9a-f]{16} in analytics\.pairs "
                        r"at mongodb://\S+", line), line


def test_check_warns_about_a_retired_key(tmp_path: Path, mongo_uri: str) -> None:
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "x")
    doc["mongo"]["server_selection_timeout_ms"] = 5000
    config = write_settings(tmp_path / "settings.yaml", doc)
    result = ingestd("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"warning: {config}: mongo.server_selection_timeout_ms" in result.stdout


def test_check_invalid_settings_names_file_key_and_reason(tmp_path: Path, mongo_uri: str) -> None:
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "x")
    doc["writer"]["batch_size"] = -5
    config = write_settings(tmp_path / "settings.yaml", doc)
    result = ingestd("check", "--config", str(config))
    assert result.returncode == 78
    line = next(ln for ln in result.stderr.splitlines() if "writer.batch_size" in ln)
    assert str(config) in line
    assert re.search(r"writer\.batch_size: .*\S", line), line
    assert result.stdout == ""


# -- a state folder that cannot be used ------------------------------------------------------------


def unusable_state_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """state_dir values no user could use, with the reason check and run must give."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("")  # a parent path component that is a regular file
    taken = tmp_path / "taken"
    (taken / "run").mkdir(parents=True)
    (taken / "spool").write_text("")  # the stream worker's folder is a file
    proc = Path("/proc/ingestd")  # the input audit: access(2) tells root it may write in /proc
    return {"parent_is_a_file": (typo / "state", f"{typo} is not a directory"),
            "spool_is_a_file": (taken, f"{taken / 'spool'} is not a directory"),
            "on_proc": (proc, f"{proc} is on the kernel's proc file system, which holds no files")}


@pytest.mark.parametrize("case", ["parent_is_a_file", "spool_is_a_file", "on_proc"])
def test_check_and_run_refuse_a_state_folder_that_cannot_be_used(tmp_path: Path, mongo_uri: str,
                                                                 case: str) -> None:
    """check names file, key and reason (exit 78) and creates nothing; run gives one clear
    error with exit 78, before binding its metrics port: no traceback, no crash loop."""
    state_dir, reason = unusable_state_dirs(tmp_path)[case]
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "x",
                       metrics={"listen": "127.0.0.1:0"})
    doc["state_dir"] = str(state_dir)
    config = write_settings(tmp_path / "settings.yaml", doc)
    before = sorted(tmp_path.rglob("*"))
    expected = f"{config}: state_dir: {state_dir} cannot be used: {reason}"

    checked = ingestd("check", "--config", str(config))
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert checked.stderr.splitlines() == ["invalid settings:", expected]
    assert sorted(tmp_path.rglob("*")) == before  # check only looks

    ran = ingestd("run", "--config", str(config))
    output = ran.stdout + ran.stderr
    assert ran.returncode == 78, output
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [(e["level"], e["event"]) for e in events] == [("error", "state_dir_unusable")], output
    assert events[0]["error"] == expected and events[0]["key"] == "state_dir"
    assert "Traceback" not in output and "metrics_listen_failed" not in output


def test_a_bad_mongo_uri_option_is_a_settings_error_for_check_run_and_reload(
        tmp_path: Path) -> None:
    """The secrets audit: pymongo's validator raised a KeyError for ?datetime_conversion=x, and
    run, check and reload printed a traceback and exited 1."""
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json",
                       "mongodb://u:pw-canary-78@db.example.com/?datetime_conversion=x", "x")
    config = write_settings(tmp_path / "settings.yaml", doc)
    expected = (f"{config}: mongo.uri: invalid MongoDB URI: option datetime_conversion=x: "
                "Invalid datetime_conversion value")
    for command in ("check", "run", "reload"):
        result = ingestd(command, "--config", str(config))
        text = result.stdout + result.stderr
        assert result.returncode == EXIT_CONFIG, (command, text)
        assert expected in text, (command, text)
        assert "Traceback" not in text and "pw-canary" not in text, (command, text)


def test_check_refuses_a_bearer_token_http_cannot_carry(tmp_path: Path) -> None:
    """The secrets audit: a token with a non-ASCII character passed check (exit 0), then every
    connection attempt crashed the stream worker (UnicodeEncodeError in the header)."""
    doc = settings_doc("https://api.x.example/2/tweets/search/stream", "mongodb://127.0.0.1:9/",
                       "check")
    del doc["stream"]["track"]
    doc["stream"].update({"api": "v2", "rules": [{"value": "cats"}]})
    doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
    config = write_settings(tmp_path / "settings.yaml", doc)
    result = ingestd("check", "--config", str(config),
                     env={"TWITTER_BEARER_TOKEN": "AAAA-canary-tok\u00e9n"})
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "invalid settings:",
        f"{config}: auth.bearer_token: contains whitespace, a control character or a non-ASCII "
        "character; a credential is printable ASCII (check it: a paste can add a typographic "
        "quote or a look-alike letter)"]


def test_check_names_only_the_insecure_tls_option_written(tmp_path: Path) -> None:
    """tlsInsecure implies three more options in pymongo; the refusal names what the operator
    wrote. One loopback host with directConnection=true is exempt (a local test server), as
    http:// is for the stream."""
    query = "/?tlsInsecure=true&tls=true"
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json",
                       f"mongodb://u:pw-canary-77@db.example.com:27017{query}", "x")
    config = write_settings(tmp_path / "remote.yaml", doc)
    result = ingestd("check", "--config", str(config))
    assert result.returncode == 78, result.stdout + result.stderr
    assert result.stderr.splitlines()[1:] == [
        f"{config}: mongo.uri: URI option tlsInsecure turns off TLS certificate checks; "
        "allowed only for one loopback host with directConnection=true"]
    doc["mongo"]["uri"] = f"mongodb://u:pw-canary-77@127.0.0.1:27017{query}&directConnection=true"
    local = ingestd("check", "--config", str(write_settings(tmp_path / "local.yaml", doc)))
    assert local.returncode == 0, local.stdout + local.stderr


def _laughs(levels: int) -> str:
    """Billion laughs: each level an alias list of nine of the level below (9**levels values)."""
    lines = ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("text", "where", "reason"), [
    ("x: &a [*a]\n", "x[0]", "a recursive alias"),
    ("stream: &s {track: [a], backoff: *s}\n", "stream.backoff", "a recursive alias"),
    (_laughs(9), "l5", "expands to more than 100,000 values"),
    ("x: " + "[" * 40 + "]" * 40 + "\n", "x", "nested deeper than 32 levels"),
    ("x: " + "[" * 3000 + "]" * 3000 + "\n", "", "YAML nested too deeply"),
])
def test_check_refuses_yaml_alias_bombs_with_a_reason(tmp_path: Path, text: str, where: str,
                                                      reason: str) -> None:
    """Recursive aliases, billion laughs and deep nesting: a bounded refusal naming the file
    and key (exit 78), not a RecursionError or a process eating memory."""
    config = tmp_path / "anchors.yaml"
    config.write_text(text)
    result = ingestd("check", "--config", str(config))
    assert result.returncode == 78, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    prefix = f"{config}: {where}: " if where else f"{config}: "
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith(prefix)]
    assert reason in line, line


@pytest.fixture(scope="module")
def strict_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """A simulator that accepts OAuth timestamps only within 30 s of its own clock."""
    sim = SimProcess(tmp_path_factory.mktemp("sim"), "--rate", "100", "--keepalive", "0.5",
                     "--timestamp-window", "30").start()
    yield sim
    sim.stop()


def online_config(tmp_path: Path, url: str, mongo_uri: str, **mongo: Any) -> Path:
    doc = settings_doc(url, mongo_uri, "check")
    doc["mongo"].update(mongo)
    return write_settings(tmp_path / "settings.yaml", doc)


def test_check_online_ok(tmp_path: Path, strict_sim: SimProcess, mongo_uri: str) -> None:
    result = ingestd("check", "--online", "--config",
                     str(online_config(tmp_path, strict_sim.url, mongo_uri)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ping ok" in result.stdout
    assert "connected (HTTP 200)" in result.stdout


def test_check_online_wrong_credentials(tmp_path: Path, strict_sim: SimProcess,
                                        mongo_uri: str) -> None:
    config = online_config(tmp_path, strict_sim.url, mongo_uri)
    result = ingestd("check", "--online", "--config", str(config),
                     env={"TWITTER_CONSUMER_SECRET": "not-the-right-secret"})
    assert result.returncode == EXIT_UNAVAILABLE  # 69: a service check needs said no
    assert "HTTP 401" in result.stdout
    assert "credentials rejected" in result.stdout
    assert "clock" not in result.stdout.replace("clock agrees", "")


def test_check_online_skewed_clock(tmp_path: Path, strict_sim: SimProcess,
                                   mongo_uri: str) -> None:
    # The check process alone runs SKEW seconds ahead (OAuth timestamp and its idea of "now").
    prelude = (f"import time\n_real = time.time\n"
               f"time.time = lambda: _real() + {SKEW}")
    config = online_config(tmp_path, strict_sim.url, mongo_uri)
    result = ingestd("check", "--online", "--config", str(config), prelude=prelude)
    assert result.returncode == EXIT_UNAVAILABLE  # 69: a service check needs said no
    found = re.search(r"local clock is (\d+)s ahead of the server's", result.stdout)
    assert found, result.stdout
    assert abs(int(found.group(1)) - SKEW) <= 5, "the measured offset is reported"


def test_check_online_mongo_unreachable(tmp_path: Path, strict_sim: SimProcess) -> None:
    config = online_config(tmp_path, strict_sim.url, "mongodb://127.0.0.1:9/", timeout_ms=1000)
    result = ingestd("check", "--online", "--config", str(config))
    assert result.returncode == EXIT_UNAVAILABLE  # 69: a service check needs said no
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("mongo"))
    assert "MongoDB is not reachable at mongodb://127.0.0.1:9/" in line
    assert "connection refused" in line.lower()
    print("\n" + result.stdout)


def test_coverage_and_reload_exit_codes_for_what_is_not_there(tmp_path: Path) -> None:
    """Not bugs, so not 1 ("unexpected error"): coverage with MongoDB unreachable exits 69 like
    check --online; reload with no daemon exits 3 like status."""
    config = online_config(tmp_path, "http://127.0.0.1:9/1.1/statuses/filter.json",
                           "mongodb://127.0.0.1:9/", timeout_ms=1000)
    coverage = ingestd("coverage", "--config", str(config))
    assert coverage.returncode == EXIT_UNAVAILABLE, coverage.stdout + coverage.stderr
    assert "coverage: MongoDB is not reachable at mongodb://127.0.0.1:9/" in coverage.stderr
    reload = ingestd("reload", "--config", str(config))
    assert reload.returncode == 3, reload.stdout + reload.stderr
    assert reload.stderr.startswith("ingestd: no running daemon")
    status = ingestd("status", "--config", str(config))
    assert status.returncode == reload.returncode


def offline_config(tmp_path: Path) -> Path:
    """A valid settings file whose secrets are not set (reload and status need none)."""
    return write_settings(tmp_path / "settings.yaml", {
        "stream": {"url": "http://127.0.0.1:9/1.1/statuses/filter.json", "track": ["x"]},
        "auth": {k: "${NOT_HERE}" for k in ("consumer_key", "consumer_secret", "access_token",
                                            "access_token_secret")},
        "mongo": {"uri": "mongodb://127.0.0.1:9/"}})


def own_pid_namespace() -> list[str]:
    """A prefix running a command in a pid namespace of its own, where kill(-1) and pid 1 reach
    only what it started: a regression of what the tests below prove must not hang up the
    machine's processes."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a pid namespace of its own")
    return ["unshare", "--pid", "--fork", "--mount-proc"]


@pytest.mark.parametrize(("pid", "code", "says"), [
    ("-1", 2, "argument --pid: not a process id: '-1' (a pid is positive)"),
    ("0", 2, "argument --pid: not a process id: '0' (a pid is positive)"),
    ("x1", 2, "argument --pid: not a process id: 'x1'"),
    ("1", 3, "ingestd: not signalling pid 1: it is not an ingestd supervisor (it holds no "
             "run/supervisor.lock open)"),
    ("$bystander", 3, "it is not an ingestd supervisor"),
])
def test_reload_signals_no_process_but_an_ingestd_supervisor(tmp_path: Path, pid: str,
                                                            code: int, says: str) -> None:
    # `--pid -1` hung up every process root may signal (kill(-1, SIGHUP)), `--pid 0` was taken
    # as "no --pid", and pid 1 (systemd reloads itself on SIGHUP) or any other program got the
    # signal, then 30 s of waiting for a verdict and exit 69.
    config = offline_config(tmp_path)
    script = (f"sleep 60 & bystander=$!; {sys.executable} -m ingestd reload --config {config} "
              f"--timeout 2 --pid {pid}; code=$?; kill -0 $bystander && echo bystander alive; "
              "kill $bystander; exit $code")
    # pid 1 of the namespace is this sh, which takes no signal it has no handler for
    run = subprocess.run([*own_pid_namespace(), "sh", "-c", script], capture_output=True,
                         text=True, timeout=60, env=_base_env(), check=False)
    assert run.returncode == code, run.stdout + run.stderr
    assert says in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == "bystander alive\n"


def test_reload_timeout_must_be_seconds_above_zero(tmp_path: Path) -> None:
    # `--timeout nan` or `-1` ended every wait at once: "no verdict within nans", exit 69.
    config = offline_config(tmp_path)
    for value in ("nan", "-1", "0", "inf", "soon"):
        run = ingestd("reload", "--config", str(config), "--timeout", value)
        assert run.returncode == 2, run.stderr
        assert "argument --timeout: not a number of seconds" in run.stderr
        assert f"{value!r}" in run.stderr


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server on loopback with a self-signed certificate (made by the openssl CLI)."""
    if shutil.which("openssl") is None:
        unavailable("openssl CLI not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/1.1/statuses/filter.json"
    server.shutdown()
    server.server_close()


def test_check_online_untrusted_certificate(tmp_path: Path, tls_server: str,
                                            mongo_uri: str) -> None:
    result = ingestd("check", "--online", "--config",
                     str(online_config(tmp_path, tls_server, mongo_uri)))
    assert result.returncode == EXIT_UNAVAILABLE  # 69: a service check needs said no
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("endpoint"))
    assert "not signed by a trusted CA" in line and "stream.ca_file" in line
    assert "curl error 60" in line


def test_the_daemon_names_stream_ca_file_when_the_certificate_is_not_trusted(
        tmp_path: Path, tls_server: str, mongo_uri: str) -> None:
    """The secrets audit: ``check --online`` named the setting, the daemon's log line and
    status said only OpenSSL's "self-signed certificate (18)"."""
    daemon = Daemon(tmp_path / "daemon", settings_doc(tls_server, mongo_uri, "tls_reason"))
    try:
        daemon.start().wait_ready()
        ended = daemon.wait_log("stream_ended", ending="tls_certificate")
        def stated() -> str | None:
            state = str(daemon.status("stream").get("state", ""))
            return state if "curl error" in state else None
        state = wait_until(stated, 30, "the reason in the status")
        code, _ = daemon.stop()
    finally:
        daemon.kill()
    assert code == 0
    for text in (ended["reason"], state):
        assert "not signed by a trusted CA" in text and "set stream.ca_file" in text, text
        assert "curl error 60" in text, text


def test_status_finds_the_units_state_folder_from_a_shell_without_secrets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd, ``state_dir: null`` means $STATE_DIRECTORY, which a root shell lacks: the
    operator's commands look in the unit's folder when a daemon lives there, none next to the
    file, and resolve no `${NAME}` secret to do so."""
    from ingestd.config.settings import load_settings
    from ingestd.control import daemonctl, runstate

    config = tmp_path / "etc" / "settings.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "stream": {"url": "https://stream.example.org/1.1/statuses/filter.json",
                   "track": ["x"]},
        "auth": {"consumer_key": "${NOT_HERE}", "consumer_secret": "${NOT_HERE}",
                 "access_token": "${NOT_HERE}", "access_token_secret": "${NOT_HERE}"},
        "mongo": {"uri": "${MONGO_URI_NOT_HERE}"}}))
    unit_dir = tmp_path / "var-lib-ingestd"
    monkeypatch.setattr(daemonctl, "SYSTEMD_STATE_DIR", unit_dir)
    env = {"PATH": "/usr/bin"}
    settings = load_settings(config, env, secrets=False)
    nobody_yet = daemonctl.locate_state_dir(settings, env)
    (runstate.run_dir(unit_dir) / daemonctl.PIDFILE).write_text(f"{os.getpid()}\n")
    found = daemonctl.locate_state_dir(settings, env)
    unit_env = {"STATE_DIRECTORY": str(tmp_path / "s")}  # inside the unit (ExecReload=)
    inside = daemonctl.locate_state_dir(load_settings(config, unit_env, secrets=False), unit_env)

    assert nobody_yet == config.parent / "state"
    assert found == unit_dir
    assert inside == tmp_path / "s"  # as the daemon itself resolved it
    with pytest.raises(ConfigError, match=r"auth\.consumer_key: \$\{NOT_HERE\} is not set"):
        load_settings(config, env)  # the daemon's own load still resolves and checks them


def test_help_lists_only_user_commands() -> None:
    shown = ingestd("--help")
    assert shown.returncode == 0
    assert "SUPPRESS" not in shown.stdout
    assert not re.search(r"^\s+worker\s", shown.stdout, re.MULTILINE)  # internal command
    assert re.search(r"^\s+reload\s", shown.stdout, re.MULTILINE)


def test_status_finds_an_instances_state_folder(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``ingestd@news`` reads /etc/ingestd/news.yaml and keeps its state in
    /var/lib/ingestd/news: from a root shell, ``--config news.yaml`` finds that folder, not the
    plain unit's /var/lib/ingestd (where settings.yaml still finds its daemon)."""
    from ingestd.config.settings import load_settings
    from ingestd.control import daemonctl, runstate

    etc = tmp_path / "etc"
    etc.mkdir()
    doc = {"stream": {"url": "https://stream.example.org/1.1/statuses/filter.json",
                      "track": ["x"]},
           "auth": {k: "${NOT_HERE}" for k in ("consumer_key", "consumer_secret",
                                              "access_token", "access_token_secret")},
           "mongo": {"uri": "mongodb://localhost:27017"}}
    for name in ("news", "settings"):
        (etc / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    unit_dir = tmp_path / "var-lib-ingestd"
    monkeypatch.setattr(daemonctl, "SYSTEMD_STATE_DIR", unit_dir)
    env = {"PATH": "/usr/bin"}
    news = load_settings(etc / "news.yaml", env, secrets=False)
    plain = load_settings(etc / "settings.yaml", env, secrets=False)
    for folder in (unit_dir, unit_dir / "news"):
        (runstate.run_dir(folder) / daemonctl.PIDFILE).write_text(f"{os.getpid()}\n")

    assert daemonctl.locate_state_dir(news, env) == unit_dir / "news"
    assert daemonctl.locate_state_dir(plain, env) == unit_dir
    (unit_dir / "news" / runstate.RUN_DIR / daemonctl.PIDFILE).unlink()  # instance stopped
    # Stopped: "not running" for news, never the plain unit's daemon in its place.
    assert daemonctl.locate_state_dir(news, env) == etc / "state"


# -- check --online beside a running stream (a v1.1 probe would log it out: code 7) ---------------


def _streaming(tmp_path: Path, mongo_uri: str, db: str, **sections: Any
               ) -> tuple[SimProcess, Daemon]:
    """A daemon connected to its own simulator: (simulator, daemon)."""
    sim = SimProcess(tmp_path / "sim", "--rate", "50", "--keepalive", "0.5").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, db, **sections))
    daemon.start()
    try:
        daemon.wait_ready()
        daemon.wait_log("connected", conn=1)
    except BaseException:
        daemon.kill()
        sim.stop()
        raise
    return sim, daemon


def _assert_untouched(sim: SimProcess, daemon: Daemon) -> None:
    truth = sim.ground_truth()
    assert [c["conn"] for c in truth.connections()] == [1], "the check opened a connection"
    assert not truth.control("disconnect"), "the running stream was logged out (code 7)"
    assert not daemon.events("stream_disconnect") and not daemon.events("stream_ended")


def test_check_online_beside_a_running_daemon_skips_the_probe(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim, daemon = _streaming(tmp_path, mongo_uri, mongo_database)
    try:
        result = ingestd("check", "--online", "--config", str(daemon.config))
        _assert_untouched(sim, daemon)
    finally:
        finish(daemon, sim)
    print("\n" + result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ping ok" in result.stdout
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("endpoint"))
    assert line.startswith("endpoint   probe skipped: a running ingestd holds this settings' "
                           f"state folder {daemon.state_dir}"), line
    assert "were not tested" in line and "code 7" in line


def test_check_online_from_another_host_of_a_standby_pair_skips_the_probe(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """Another state folder (another host), same account and lease: the lease tells."""
    sim, daemon = _streaming(tmp_path, mongo_uri, mongo_database,
                             ha={"mode": "standby", "lease_seconds": 3})
    other = {**daemon.doc, "state_dir": str(tmp_path / "other" / "state")}
    try:
        wait_until(lambda: daemon.status("stream").get("ha", {}).get("role") == "active", 30,
                   "the daemon holds the lease")
        result = ingestd("check", "--online", "--config",
                         str(write_settings(tmp_path / "other" / "settings.yaml", other)))
        _assert_untouched(sim, daemon)
    finally:
        finish(daemon, sim)
    print("\n" + result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    holder = daemon.status("stream")["ha"]["instance"]
    assert re.search(rf"endpoint   probe skipped: the standby lease stream:[0-9a-f]{{16}} is held "
                     rf"by {re.escape(holder)}, which is renewing it", result.stdout), result.stdout


def test_check_online_probes_when_no_stream_runs(tmp_path: Path, strict_sim: SimProcess,
                                                 mongo_uri: str) -> None:
    """A stopped daemon's state folder (its lock file left behind) does not block the probe."""
    config = online_config(tmp_path, strict_sim.url, mongo_uri)
    run = tmp_path / "state" / "run"
    run.mkdir(parents=True)
    (run / "supervisor.lock").touch()
    result = ingestd("check", "--online", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "connected (HTTP 200)" in result.stdout


# -- check --online with X API v2: the rules endpoint, never a stream -----------------------------

V2_TOKEN = "AAAAAAAAAAAAAAAAAAAAAcheck-v2-token-ingestd-tests"


@pytest.fixture(scope="module")
def v2_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    sim = SimProcess(tmp_path_factory.mktemp("v2sim"), "--keepalive", "1",
                     env={"TWITTER_BEARER_TOKEN": V2_TOKEN}).start()
    yield sim
    sim.stop()


def v2_config(tmp_path: Path, sim: SimProcess, mongo_uri: str, **ha: Any) -> Path:
    doc = settings_doc(f"http://127.0.0.1:{sim.port}/2/tweets/search/stream", mongo_uri, "check")
    del doc["stream"]["track"]
    doc["stream"].update({"api": "v2", "rules": [{"value": "coffee OR music", "tag": "drinks"},
                                                 {"value": "rain -sunny"}]})
    doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
    if ha:
        doc["ha"] = ha
    return write_settings(tmp_path / "settings.yaml", doc)


def test_check_online_v2_asks_the_rules_endpoint_with_the_bearer_token(
        tmp_path: Path, v2_sim: SimProcess, mongo_uri: str) -> None:
    result = ingestd("check", "--online", "--config", str(v2_config(tmp_path, v2_sim, mongo_uri)),
                     env={"TWITTER_BEARER_TOKEN": V2_TOKEN})
    print("\n" + result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"  filters +2 rules \(v2", result.stdout), result.stdout
    assert "bearer token accepted (no stream opened)" in result.stdout
    assert "rules      2 configured, 0 on the server: 2 to add, 0 to delete" in result.stdout
    assert not [c for c in v2_sim.ground_truth().connections() if c.get("api") == "v2"]


def test_check_online_v2_reports_a_rejected_token(tmp_path: Path, v2_sim: SimProcess,
                                                  mongo_uri: str) -> None:
    wrong = "AAAAAAAAAAAAAAAAAAAAAwrong-check-token"
    result = ingestd("check", "--online", "--config", str(v2_config(tmp_path, v2_sim, mongo_uri)),
                     env={"TWITTER_BEARER_TOKEN": wrong})
    assert result.returncode == EXIT_UNAVAILABLE, result.stdout + result.stderr
    assert "endpoint   FAILED: token rejected: check auth.bearer_token (HTTP 401" in result.stdout
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("endpoint"))
    assert "HTTP 401: HTTP 401" not in line and "Unauthorized: Unauthorized" not in line, line
    assert wrong not in result.stdout + result.stderr


def test_check_and_run_refuse_a_v2_standby_pair(tmp_path: Path, v2_sim: SimProcess,
                                                mongo_uri: str) -> None:
    config = v2_config(tmp_path, v2_sim, mongo_uri, mode="standby")
    env = {"TWITTER_BEARER_TOKEN": V2_TOKEN}
    for command in ("check", "run"):  # run logs it (settings_invalid); reload loads the same way
        result = ingestd(command, "--config", str(config), env=env)
        text = result.stdout + result.stderr
        assert result.returncode == EXIT_CONFIG, text
        why = re.search(rf"{re.escape(str(config))}: ha\.mode: standby is for stream\.api v1\.1"
                        r"[^\n\"]*", text)
        assert why, text
        assert "429 TooManyConnections" in why[0] and "ha.mode: redundant" in why[0]
