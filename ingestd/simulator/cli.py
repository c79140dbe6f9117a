"""``ingestd simulate``: flags, start-up checks, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from ingestd.simulator.auth import Credentials, OAuthVerifier, load_credentials
from ingestd.simulator.backlog import QUEUE_DEFAULT
from ingestd.simulator.feed import SOURCES
from ingestd.simulator.groundtruth import GroundTruth
from ingestd.simulator.script import FaultScript, ScriptError
from ingestd.simulator.server import Simulator
from ingestd.simulator.state import SimConfig, SimState
from ingestd.simulator.v2 import V2Options

APIS = ("v1.1", "v2", "both")
EXIT_USAGE = 2
EXIT_CONFIG = 78


def _rate_limit(text: str) -> tuple[int, float]:
    """``N/SECONDS``, e.g. ``5/300`` = at most 5 connection attempts per 5 minutes."""
    try:
        count, seconds = text.split("/")
        parsed = int(count), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N/SECONDS, got {text!r}") from None
    if parsed[0] < 1 or parsed[1] <= 0:
        raise argparse.ArgumentTypeError(f"expected N >= 1 and SECONDS > 0, got {text!r}")
    return parsed


def _non_negative(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``simulate`` flags (the lead's ``ingestd/cli.py`` mounts them as a subcommand)."""
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="bind address (loopback only unless --allow-remote)")
    a("--allow-remote", action="store_true", help="allow a non-loopback --host")
    a("--behind-tls", action="store_true",
      help="clients reach this port through a TLS-terminating front, so they sign https:// URLs "
           "(OAuth 1.0a's base string includes the scheme)")
    a("--port", type=_non_negative(int), default=0, help="0 picks a free port")
    a("--port-file", type=Path, help="write the bound port here (atomically) once listening")
    a("--ground-truth", type=Path, help="JSONL log of every connect/tweet/control/close event")
    a("--source", choices=SOURCES, default="mixed", help="real, generated or mixed tweets")
    a("--rate", type=_non_negative(float), default=50.0, help="tweets/s per connection; 0 = max")
    a("--max-tweets", type=_non_negative(int), help="tweets per connection, then keep-alives")
    a("--keepalive", type=_non_negative(float), default=30.0, help="idle seconds per \\r\\n")
    a("--control-every", type=_non_negative(int), default=25, help="tweets per control; 0 = off")
    a(
        "--warning-interval",
        type=_non_negative(float),
        default=300.0,
        help="minimum seconds between FALLING_BEHIND warnings to a client that falls behind "
        "(stall_warnings=true only)",
    )
    a("--queue", type=_non_negative(int), default=QUEUE_DEFAULT,
      help="tweets the endpoint queues for a client that reads slower than --rate: "
           "FALLING_BEHIND from 60%% full (stall_warnings=true), disconnect code 4 when full; "
           "0 = unbounded (TCP back-pressure only, the client just slows the stream)")
    a(
        "--script",
        type=Path,
        help="fault script (JSON or YAML list of per-connection steps: ingestd/simulator/"
        "script.py); 'corrupt_gzip: true' sends bytes no gzip stream can go on with in a chunk of "
        "their own, 'corrupt_gzip: {tweets: N, partial: true}' in one write after N tweets and the "
        "first half of one more (v1.1; a v2 stream sends them alone)",
    )
    a("--credentials", type=Path, help="YAML/JSON with the four TWITTER_* keys (else env)")
    a(
        "--timestamp-window",
        type=_non_negative(float),
        default=600.0,
        help="accepted OAuth clock skew in seconds",
    )
    a("--rate-limit", type=_rate_limit, help="N/SECONDS connection attempts before 420")
    a("--seed", type=int, help="seed for reproducible generated tweets")
    a("--max-line", type=_non_negative(int), default=600_000, help="size of 'oversize' bad lines")
    a("--redundant", type=_non_negative(int), default=1,
      help="live streams per credentials or v2 app (v2 Enterprise redundant connections), each "
           "carrying the same tweets; one more logs the oldest out in v1.1 (code 7; 1 = v1.1) "
           "and gets 429 TooManyConnections in v2")
    # X API v2 (simulator/v2.py): the token is read from the environment like the OAuth keys.
    a("--bearer-token-env", default="TWITTER_BEARER_TOKEN",
      help="environment variable holding the accepted v2 bearer token (unset = v2 refuses all)")
    a("--max-rules", type=_non_negative(int), default=25,
      help="v2 rules the app may hold (thousands for an Enterprise-sized list, served in pages)")
    a("--max-rule-length", type=_non_negative(int), default=512, help="v2 rule length limit")
    a("--api", choices=APIS,
      help="serve only v1.1 (needs the four OAuth keys), only v2 (needs only the bearer token) "
           "or both (needs both); unset = v1.1, plus v2 when the token is set")
    a("--v2-close-lag", type=_non_negative(float), default=0.0,
      help="seconds a v2 stream whose client went away still holds the app's one connection")


def _check_host(args: argparse.Namespace) -> str | None:
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.allow_remote:
        return f"--host {args.host} is not a loopback address; add --allow-remote to bind it"
    return None


def build_state(args: argparse.Namespace) -> SimState:
    """Validate inputs and build the shared state; raises ``ValueError`` with a clear message."""
    if args.keepalive <= 0:
        raise ValueError(f"--keepalive must be more than 0 seconds, got {args.keepalive}")
    if args.redundant < 1:
        raise ValueError(f"--redundant must be at least 1, got {args.redundant}")
    creds = _credentials(args)
    script = FaultScript.load(args.script) if args.script else None
    config = SimConfig(
        credentials=creds,
        source=args.source,
        rate=args.rate,
        max_tweets=args.max_tweets,
        keepalive=args.keepalive,
        control_every=args.control_every,
        script=script,
        timestamp_window=args.timestamp_window,
        rate_limit=args.rate_limit,
        seed=args.seed,
        max_line=args.max_line,
        warning_interval=args.warning_interval,
        queue=int(args.queue),
        ground_truth=args.ground_truth,
        redundant=int(args.redundant),
        apis=("v1.1", "v2") if args.api in (None, "both") else (args.api,),
        signed_scheme="https" if args.behind_tls else "http",
    )
    return SimState(
        config=config,
        ground_truth=GroundTruth(args.ground_truth),
        verifier=OAuthVerifier(creds, args.timestamp_window),
    )


def _credentials(args: argparse.Namespace) -> list[Credentials]:
    """The OAuth keys the APIs served need (none for v2 only); one error names all that is
    missing, the bearer token included."""
    problems: list[str] = []
    creds: list[Credentials] = []
    if args.api != "v2":
        try:
            creds = load_credentials(args.credentials)
        except ValueError as exc:
            problems.append(str(exc))
    if args.api in ("v2", "both") and not os.environ.get(args.bearer_token_env):
        problems.append(f"no bearer token: set {args.bearer_token_env} (--bearer-token-env)")
    if problems:
        raise ValueError("; ".join(problems))
    return creds


def _write_port_file(path: Path, port: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{port}\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean stop, 2/78 for bad flags or inputs."""
    problem = _check_host(args)
    if problem:
        print(f"ingestd simulate: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        state = build_state(args)
        v2 = V2Options(os.environ.get(args.bearer_token_env, ""), args.max_rules,
                       args.max_rule_length, args.v2_close_lag)
        sim = Simulator(state, args.host, args.port, v2)
    except (ValueError, ScriptError, OSError) as exc:
        print(f"ingestd simulate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # only flag it; the main thread does the work

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sim.start()
        if args.port_file:
            _write_port_file(args.port_file, sim.port)
        print(f"listening on {sim.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ingestd simulate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
