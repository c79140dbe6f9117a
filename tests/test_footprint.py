"""What each process imports (issue #7: RSS of all ingestd processes).

Every check runs in a fresh interpreter: this test process has pymongo loaded (conftest), and a
module, once imported, cannot be un-imported. The assertions are structural (which modules a role
carries); the VmHWM figures are printed for the record, never asserted (they belong to benchmarks).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from ingestd.config.mongo_uri import pymongo_uri_facts
from ingestd.control.pool import WORKER_MALLOC_ENV, worker_env
from tests.support.creds import CREDS
from tests.support.daemon import Daemon, settings_doc
from tests.support.simulator import SimProcess

MONGO = ("pymongo", "bson")
# structlog loads these when installed (the dev extra brings rich), for renderers ingestd never
# uses; ``ingestd.cli`` marks rich and better_exceptions absent, and pygments, which only rich
# imports, stays out with it (~4 MB per process).
NEVER = ("rich", "pygments", "better_exceptions")
# certifi (which loads importlib.resources, ~0.5 MB) only where a TLS connection is made: the
# stream worker and ``check --online`` (``config.stream.ca_bundle``).
# importlib.metadata (with email, zipfile, csv...: ~2.3 MB in S and R) only in the store worker,
# which has it from pymongo: the crc32c package's __init__ imports it for its __version__, so the
# spool loads the library's C extension without it (``ingestd.spool.checksum``). The stream worker
# has email from oauthlib (urllib.request).
# Loaded by the store worker only, or by tools (check --online, simulate, demo).
NOT_IN_SUPERVISOR = (*MONGO, *NEVER, "pycurl", "oauthlib", "ingestd.simulator",
                     "ingestd.sink.worker", "certifi", "importlib.resources",
                     "importlib.metadata", "email")
NOT_IN_STREAM = (*MONGO, *NEVER, "prometheus_client", "http.server", "ingestd.simulator",
                 "ingestd.sink.worker", "ingestd.control.metrics", "importlib.metadata")
NOT_IN_STORE = (*NEVER, "prometheus_client", "http.server", "ingestd.simulator",
                "ingestd.control.metrics", "certifi")

# Each role through its real entry point (``python -m ingestd run|worker``) up to where it would
# loop: the supervisor with its metrics listener and settings check done, the stream worker until
# its stdin (the supervisor's control pipe) is at EOF, which stops it. The store worker would need
# a MongoDB: its module imports are enough to show it has pymongo.
ENTRIES = {
    "supervisor": """
        import ingestd.control.supervisor
        import ingestd.spool.cursor  # what run() imports when it first reads the spool
        from ingestd.control.collector import known_labels
        known_labels()  # what the first scrape of /metrics imports (it once brought bson)
        ingestd.control.supervisor.Supervisor.run = lambda self: 0
        assert main(["run", "--config", sys.argv[1]]) == 0
    """,
    "stream": """
        assert main(["worker", "--role", "stream", "--config", sys.argv[1]]) == 0
    """,
    "store": """
        import ingestd.control.store_role
    """,
}
PROBE = """
import sys
import orjson
from ingestd.cli import main
{entry}
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
loaded = sorted(name for name, module in sys.modules.items() if module is not None)  # None: barred
sys.stdout.buffer.write(b"\\n" + orjson.dumps({{"modules": loaded, "hwm_kb": hwm}}))
"""


def write_settings(tmp_path: Path, uri: str = "mongodb://127.0.0.1:27017") -> Path:
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", uri, "twitter")
    doc["state_dir"] = str(tmp_path / "state")
    doc["metrics"] = {"listen": "127.0.0.1:0"}  # on, as by default
    (tmp_path / "state" / "run").mkdir(parents=True)  # made by the supervisor for its workers
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def python(code: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` in a fresh interpreter with the test credentials in its environment."""
    env = {**os.environ, **CREDS}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


def probe(role: str, config: Path) -> dict[str, Any]:
    done = python(PROBE.format(entry=textwrap.dedent(ENTRIES[role])), str(config))
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])  # after the log lines
    print(f"\n[figure] {role} imports: VmHWM {result['hwm_kb'] / 1024:.1f} MB, "
          f"{len(result['modules'])} modules")
    return result


@pytest.mark.parametrize(("role", "absent"), [
    ("supervisor", NOT_IN_SUPERVISOR), ("stream", NOT_IN_STREAM), ("store", NOT_IN_STORE)])
def test_each_role_imports_only_what_it_uses(tmp_path: Path, role: str,
                                             absent: tuple[str, ...]) -> None:
    modules = set(probe(role, write_settings(tmp_path))["modules"])
    assert not modules & set(absent), sorted(modules & set(absent))
    if role == "store":
        assert set(MONGO) <= modules  # the one process that talks to MongoDB


URIS = [
    "mongodb://localhost:27017",
    "mongodb://user:hunter2@db.example.com:notaport/",
    "mongodb://u:pw@db1.example.com,127.0.0.1/?tlsInsecure=true",
    "mongodb://localhost,[::1]/?tlsAllowInvalidHostnames=true&TLSINSECURE=true",
    "mongodb://db.example.com/?bogusOption=1",
    "mongodb://db.example.com/?datetime_conversion=x",  # a KeyError in pymongo's validator
    "mongodb://localhost/?tlsInsecure=true&directConnection=true",
    "mongodb+srv://cluster0.example.invalid/db?retryWrites=true",
    "mongodb+srv://cluster0.example.invalid:27017/",
    "http://not-mongo/",
]


def test_uri_verdict_from_the_child_equals_pymongo_in_process() -> None:
    """Without pymongo loaded, ``mongo.uri`` is judged by a child interpreter: same verdict."""
    done = python("""
        import sys, orjson
        from ingestd.config.mongo_uri import check_mongo_uri_in_child, mongo_uri_facts
        check_mongo_uri_in_child()
        facts = [mongo_uri_facts(uri) for uri in orjson.loads(sys.argv[1])]
        assert "pymongo" not in sys.modules and "bson" not in sys.modules
        sys.stdout.buffer.write(orjson.dumps(facts))
    """, orjson.dumps(URIS).decode())
    assert done.returncode == 0, done.stderr.decode()
    assert orjson.loads(done.stdout) == [pymongo_uri_facts(uri) for uri in URIS]


def test_uri_child_runs_only_when_the_uri_changes(tmp_path: Path) -> None:
    """A reload that keeps ``mongo.uri`` spawns no child; a new URI does."""
    good, other = write_settings(tmp_path), tmp_path / "other.yaml"
    other.write_text(good.read_text().replace("127.0.0.1:27017", "127.0.0.1:27018"))
    done = python("""
        import subprocess, sys
        from pathlib import Path
        from ingestd.config.mongo_uri import check_mongo_uri_in_child
        from ingestd.config.settings import load_settings
        check_mongo_uri_in_child()
        calls = []
        real_run = subprocess.run
        def counting_run(*args, **kwargs):
            calls.append(args)
            return real_run(*args, **kwargs)
        subprocess.run = counting_run
        for name in (sys.argv[1], sys.argv[1], sys.argv[2], sys.argv[2]):
            load_settings(Path(name))
        print(len(calls))
    """, str(good), str(other))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["2"]


def test_bad_uri_at_start_exits_78_with_the_reason_and_no_password(tmp_path: Path) -> None:
    config = write_settings(tmp_path, "mongodb://user:hunter2@db.example.com:notaport/")
    done = python("from ingestd.cli import main; raise SystemExit(main())",
                  "run", "--config", str(config))
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 78, output
    assert f"{config}: mongo.uri: invalid MongoDB URI" in output and "hunter2" not in output


def test_reload_with_a_bad_uri_keeps_the_old_settings_without_loading_pymongo(
        tmp_path: Path) -> None:
    config = write_settings(tmp_path)
    done = python("""
        import sys
        from pathlib import Path
        from ingestd.config.mongo_uri import check_mongo_uri_in_child
        from ingestd.config.settings import load_settings_text
        from ingestd.control.supervisor import Supervisor
        check_mongo_uri_in_child()  # as `ingestd run` does
        config = Path(sys.argv[1])
        text = config.read_text()
        sup = Supervisor(config, load_settings_text(text, config), text=text)
        config.write_text(text.replace("127.0.0.1:27017", "u:hunter2@db.example.com:x/"))
        sup.reload()
        assert sup.standing.reload_failures == 1 and sup.standing.generation == 1, sup.standing
        assert sup.settings_text == text and "27017" in sup.settings.mongo.uri.reveal()
        assert "pymongo" not in sys.modules
    """, str(config))
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, output
    assert "reload_failed" in output and "mongo.uri" in output and "hunter2" not in output


def test_workers_run_with_fixed_malloc_thresholds(tmp_path: Path, mongo_uri: str,
                                                  mongo_database: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's dynamic mmap threshold would keep every batch-sized buffer in the workers' heaps:
    the supervisor starts its workers with fixed thresholds (an operator's own value wins, key by
    key), and the store worker's encoder child inherits them."""
    assert set(WORKER_MALLOC_ENV) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    for key in WORKER_MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    assert {k: worker_env()[k] for k in WORKER_MALLOC_ENV} == WORKER_MALLOC_ENV
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    env = worker_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == "4194304"
    assert env["MALLOC_TRIM_THRESHOLD_"] == WORKER_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    sim = SimProcess(tmp_path / "sim", "--max-tweets", "0", "--keepalive", "1").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        daemon.start()
        daemon.wait_ready(60)
        environs = {role: Path(f"/proc/{daemon.worker_pid(role)}/environ").read_bytes()
                    for role in ("stream", "store")}
        assert daemon.proc is not None
        supervisor = Path(f"/proc/{daemon.proc.pid}/environ").read_bytes()
    finally:
        daemon.stop(30)
        sim.stop()
    for key, value in WORKER_MALLOC_ENV.items():
        setting = f"{key}={value}".encode()
        assert all(setting in env.split(b"\0") for env in environs.values()), (key, list(environs))
        assert setting not in supervisor.split(b"\0")  # the supervisor's own heap is left alone
