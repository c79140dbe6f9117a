"""The daemon's CPU per tweet at steady offered rates, with and without the encoder child.

``make bench``'s throughput runs are bursts: the spool fills faster than the store worker empties
it. A stream the store worker keeps up with is another regime: this runs the real ``ingestd run``
daemon (``bench/run.py``'s ``Daemon``, payload server and blackhole) at each ``--rates`` rate and
each ``writer.encoder_process`` setting of ``--encoder``, interleaved, and prints, over a window
of ``--seconds`` after a warm-up, the tweets stored per second and the CPU µs per stored tweet of
all the daemon's processes (and by process). ``--pipeline`` adds, at each rate, the one-process
pipeline contender (``bench/contenders.py threaded``) on the same paced stream: its CPU per stored
tweet from its first byte to its last insert, the same-run baseline of goal 2 (on this VM a paced
stream costs every contender more per tweet than a burst does: bench/LOG.md). ``--gzip`` asks
for a compressed stream. Prints figures; asserts only that tweets were stored.

    .venv/bin/python bench/steady.py                                  # 5k and 10k/s, auto vs false
    .venv/bin/python bench/steady.py --rates 10000 --encoder auto,true,false --repeats 3
    .venv/bin/python bench/steady.py --rates 5000 --encoder auto --pipeline --gzip
    .venv/bin/python bench/steady.py --rates 5000 --encoder auto --gzip --keep-awake

``--keep-awake`` keeps the machine's vCPUs from halting while it runs (``bench/awake.py``: a
diagnostic of what idle vCPUs cost on a VM, not a goal's figure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: variant trees

from bench import run
from bench.awake import kept_awake
from tests.support.wait import wait_until


def steady(bench: run.Bench, rate: float, seconds: float, warmup: float, encoder: str,
           gzip: bool = False, batch_size: int = 0) -> dict[str, Any]:
    """One daemon at ``rate`` tweets/s: stored/s and CPU µs per stored tweet over the window."""
    doc = bench.ingestd_doc(bench.blackhole.uri, gzip)
    doc["writer"] = {"encoder_process": {"auto": "auto", "true": True, "false": False}[encoder]}
    if batch_size:
        doc["writer"]["batch_size"] = batch_size
    daemon = run.Daemon(bench.next_dir(f"steady-{rate:g}-{encoder}"), doc)
    bench.blackhole.reset(0)
    bench.server.arm(bench.payload.tweets, rate)
    daemon.start(bench.daemon_env)
    try:
        bench.server.wait_delivery(60)
        daemon.wait_ready(60)
        bench.server.go()
        time.sleep(warmup)  # the rate to settle, and auto mode's choice with it
        assert daemon.proc is not None
        procs = run.grow(run.tree(daemon.proc.pid), daemon.proc.pid)
        started, stored0 = store_written(daemon, 0.0)
        cpu0 = run.cpu_by_role(procs)
        time.sleep(seconds)  # the measuring window: a duration, not a wait for an event
        ended, stored1 = store_written(daemon, started + seconds)
        procs = run.grow(procs, daemon.proc.pid)
        cpu1 = run.cpu_by_role(procs)
        elapsed = ended - started
        daemon.assert_running()
    finally:
        daemon.stop(60)
    stored = stored1 - stored0
    if stored <= 0:
        raise RuntimeError(f"nothing stored at {rate:g}/s with encoder_process {encoder}")
    roles = {k: 1e6 * (v - cpu0.get(k, 0.0)) / stored for k, v in cpu1.items()}
    return {"rate": rate, "encoder": encoder, "batch_size": batch_size,
            "stored_per_s": stored / elapsed, "us_per_tweet": sum(roles.values()), "by_role": roles}


def store_written(daemon: run.Daemon, after: float) -> tuple[float, int]:
    """The store worker's next status write later than ``after`` (its own clock): its time and
    stored count. The counts are published once a second, so a window read at arbitrary moments
    could span no write at all (and read 0 stored) or two; between writes it spans the counts'
    own interval."""
    def written() -> tuple[float, int] | None:
        daemon.assert_running()
        doc = daemon.status("store")
        at = float(doc.get("time", 0.0))
        return (at, int(doc.get("counters", {}).get("stored", 0))) if at > after else None
    if after == 0.0:
        after = float(daemon.status("store").get("time", 0.0))
    return wait_until(written, 30, "the store worker's next status write", interval=0.01)


def pipeline(bench: run.Bench, rate: float, seconds: float, warmup: float, gzip: bool
             ) -> dict[str, Any]:
    """The threaded pipeline contender on the same paced stream, as long as the daemon's run."""
    tweets = min(bench.payload.tweets, int(rate * (warmup + seconds)))
    result = bench.run_contender("threaded", gzip, tweets, rate=rate)
    return {"rate": rate, "stored_per_s": result.rate, "us_per_tweet": result.us_per_tweet}


def line(r: dict[str, Any]) -> str:
    roles = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["by_role"].items()) if v >= 0.05)
    size = f"  batch_size {r['batch_size']:<5}" if r["batch_size"] else ""
    return (f"{r['rate']:>7,.0f}/s offered  encoder_process {r['encoder']:<5}{size}  stored "
            f"{r['stored_per_s']:>7,.0f}/s  CPU {r['us_per_tweet']:5.1f} µs/tweet ({roles})")


def pipeline_line(r: dict[str, Any]) -> str:
    return (f"{r['rate']:>7,.0f}/s offered  pipeline (threaded)    stored "
            f"{r['stored_per_s']:>7,.0f}/s  CPU {r['us_per_tweet']:5.1f} µs/tweet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5000,10000", help="comma list of tweets/s")
    parser.add_argument("--encoder", default="auto,false",
                        help="comma list of writer.encoder_process values: auto, true, false")
    parser.add_argument("--batch-sizes", default="0",
                        help="comma list of writer.batch_size values (0: the default)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--payload-tweets", type=int, default=200_000)
    parser.add_argument("--cache", type=Path, default=run.CACHE)
    parser.add_argument("--tree", type=Path, help="run the daemon from this source tree")
    parser.add_argument("--workdir", type=Path, help="keep the daemons' folders (logs) here")
    parser.add_argument("--pipeline", action="store_true",
                        help="also run the threaded pipeline contender at each rate")
    parser.add_argument("--gzip", action="store_true", help="a gzip'd stream (default: plain)")
    parser.add_argument("--keep-awake", action="store_true",
                        help="a SCHED_IDLE busy loop on each CPU: idle vCPUs never halt")
    args = parser.parse_args(argv)
    payload = run.build(args.cache, args.payload_tweets, progress=False)
    ns = argparse.Namespace(tree=args.tree, split_share=1.0, encode_budget=1.0)
    with run.workspace(args.workdir, False) as workdir, kept_awake(args.keep_awake):
        bench = run.Bench(ns, payload, workdir)
        bench.show_progress = False  # one line per run is the output
        try:
            for _ in range(args.repeats):  # interleaved: the machine's moods hit all alike
                for rate in (float(r) for r in args.rates.split(",")):
                    for encoder in args.encoder.split(","):
                        for size in (int(b) for b in args.batch_sizes.split(",")):
                            result = steady(bench, rate, args.seconds, args.warmup, encoder,
                                            args.gzip, size)
                            print(line(result), flush=True)
                    if args.pipeline:
                        print(pipeline_line(pipeline(bench, rate, args.seconds, args.warmup,
                                                     args.gzip)), flush=True)
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
