"""Command line: ``ingestd run | check | status | reload | coverage | simulate | demo``."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from ingestd import __version__

EXIT_USAGE = 2
# `ingestd run`'s stop and reload signals, held pending from its first line until the
# supervisor's handlers take them (``supervisor.SignalQueue.install`` lets them in): until then
# SIGHUP's default action would end the daemon without a line, and SIGINT raise a traceback.
HELD_AT_START = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
# structlog imports rich and better_exceptions whenever they are installed (a development tool
# brings rich), for a console renderer and tracebacks that ingestd never uses: rich and pygments
# cost every daemon process ~4 MB. Marked absent here, before anything imports structlog, they are
# never loaded (the console format prints plain tracebacks either way).
for _unused in ("rich", "better_exceptions"):
    sys.modules.setdefault(_unused, None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        # Internal: how the supervisor starts its workers. Not a user command, so not in --help.
        args = build_worker_parser().parse_args(argv[1:])
        return cmd_worker(args)
    if argv[:1] == ["run"]:  # the daemon logs to stdout: a report's tolerance is not for it
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)  # before the heavy imports
        return run_command(argv)
    with reader_may_leave():  # --help and usage errors included
        return run_command(argv)


def run_command(argv: list[str]) -> int:
    parser = build_parser()
    # Known args only: ``simulate`` hands the rest to the simulator's own parser.
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "simulate", False):
        return cmd_simulate(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    result: int = args.func(args)
    return result


class _PipeTolerantStdout(io.TextIOWrapper):
    """sys.stdout for a command whose reader may go away (``ingestd status | head -1``): the
    first write that meets a closed pipe points fd 1 at /dev/null (the recipe of the ``signal``
    docs' note on SIGPIPE), and the command carries on to its own exit code."""

    def write(self, s: str) -> int:
        try:
            return super().write(s)
        except BrokenPipeError:
            self._discard()
            return len(s)

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.fileno())  # what is still buffered goes there, silently
        finally:
            os.close(devnull)


@contextlib.contextmanager
def reader_may_leave() -> Iterator[None]:
    """Run a command with ``_PipeTolerantStdout``: a closed stdout neither prints a traceback
    nor changes the exit code. Flushed here, not at interpreter exit (whose EPIPE would be
    reported and exit 120)."""
    original = sys.stdout
    if original is None or not hasattr(original, "buffer"):
        yield
        return
    original.flush()
    tolerant = _PipeTolerantStdout(original.buffer, encoding=original.encoding,
                                   errors=original.errors,
                                   line_buffering=bool(original.line_buffering))
    sys.stdout = tolerant
    try:
        yield
    finally:
        sys.stdout = original
        tolerant.detach()  # flushes (tolerantly); the buffer stays open, it is fd 1's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingestd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (supervisor + workers)")
    run.add_argument("--config", type=Path, required=True, help="path to settings.yaml")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a settings file (used by the systemd unit)")
    check.add_argument("--config", type=Path, required=True)
    check.add_argument("--online", action="store_true",
                       help="also ping MongoDB and make one authenticated request to the endpoint")
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="show what a running daemon is doing")
    status.add_argument("--config", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    reload = sub.add_parser(
        "reload", help="ask a running daemon to re-read its settings and wait for its verdict",
        description="Send SIGHUP to the daemon and wait until it applied the settings file "
                    "(exit 0) or rejected it (exit 78, the reasons on stderr); exit 3 when no "
                    "daemon runs. Needs no secrets.")
    reload.add_argument("--config", type=Path, required=True)
    reload.add_argument("--pid", type=positive_pid, default=None,
                        help="the supervisor's pid (systemd: $MAINPID); default: its pid file")
    reload.add_argument("--timeout", type=positive_seconds, default=30.0,
                        help="seconds to wait for the daemon's verdict (default 30)")
    reload.set_defaults(func=cmd_reload)

    coverage = sub.add_parser(
        "coverage", help="per-hour completeness of the archive (the coverage ledger)",
        description="Per hour: tweets stored, tweets the endpoint did not deliver (limit "
                    "notices), seconds without a connection and the gaps' causes, read from "
                    "mongo.coverage_collection. Needs the MongoDB URI only, no stream secrets.")
    coverage.add_argument("--config", type=Path, required=True)
    coverage.add_argument("--since", help="ISO 8601 time, UTC if no zone (default: until - 24h)")
    coverage.add_argument("--until", help="ISO 8601 time, UTC if no zone (default: now)")
    coverage.add_argument("--instance", help="only this instance: host:state_dir, or its "
                          "ha.instance (as status shows it)")
    coverage.add_argument("--json", action="store_true", help="machine-readable output")
    coverage.set_defaults(func=cmd_coverage)

    # Its options live in ingestd.simulator.cli, imported only to run it: every daemon process
    # starts through this parser, and the simulator pulls in http.server, oauthlib and yaml.
    simulate = sub.add_parser("simulate", add_help=False,
                              help="run the endpoint simulator on loopback (see simulate --help)")
    simulate.set_defaults(simulate=True)

    demo = sub.add_parser(
        "demo", help="simulator + daemon + embedded Mongo stand-in, then a report")
    demo.add_argument("--seconds", type=positive_seconds, default=20.0,
                      help="how long to ingest")
    demo.add_argument("--workdir", type=Path, default=Path("demo-state"),
                      help="a new folder, or one an earlier demo made (it is emptied first)")
    demo.set_defaults(func=cmd_demo)
    return parser


def positive_pid(text: str) -> int:
    """A process id for ``--pid``: kill(2) takes 0 as this process group and -1 as every
    process the caller may signal, so only a positive number is one process."""
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r} (a pid is positive)")
    return pid


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (``nan`` or ``-1`` would end every wait at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0: {text!r}")
    return value


def build_worker_parser() -> argparse.ArgumentParser:
    worker = argparse.ArgumentParser(prog="ingestd worker")
    worker.add_argument("--role", choices=["stream", "store"], required=True)
    worker.add_argument("--config", type=Path, required=True)
    # The generation in force when the worker was started (reloads come on its stdin since):
    # ``--generation`` is the older spelling, still taken.
    worker.add_argument("--start-generation", "--generation", dest="generation", type=int,
                        default=1)
    return worker


def cmd_run(args: argparse.Namespace) -> int:
    from ingestd.config.mongo_uri import check_mongo_uri_in_child
    from ingestd.control.supervisor import run_supervisor

    check_mongo_uri_in_child()  # the supervisor never talks to MongoDB: keep pymongo out
    return run_supervisor(args.config)


def cmd_worker(args: argparse.Namespace) -> int:
    # Each role's module is imported by its own process only: the stream worker must not load
    # pymongo (the store role's), the store worker not pycurl.
    if args.role == "store":
        from ingestd.control.store_role import run_store_worker

        return run_store_worker(args.config, args.generation)
    from ingestd.config.mongo_uri import check_mongo_uri_in_child
    from ingestd.control.stream_role import run_stream_worker

    check_mongo_uri_in_child()  # as for the supervisor; the store worker loads pymongo anyway
    return run_stream_worker(args.config, args.generation)


def cmd_check(args: argparse.Namespace) -> int:
    from ingestd.tools.check import run_check

    return run_check(args.config, online=args.online)


def cmd_status(args: argparse.Namespace) -> int:
    from ingestd.control.status import run_status

    return run_status(args.config, as_json=args.json)


def cmd_reload(args: argparse.Namespace) -> int:
    from ingestd.control.daemonctl import run_reload

    return run_reload(args.config, pid=args.pid, timeout=args.timeout)


def cmd_coverage(args: argparse.Namespace) -> int:
    from ingestd.tools.coverage import run_coverage

    return run_coverage(args.config, since=args.since, until=args.until,
                        instance=args.instance, as_json=args.json)


def cmd_simulate(argv: list[str]) -> int:
    from ingestd.simulator.cli import main as simulate

    return simulate(argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from ingestd.tools.demo import run_demo

    return run_demo(seconds=args.seconds, workdir=args.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
