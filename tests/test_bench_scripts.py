"""The quick bench scripts still run against this tree (they are not imported by anything else).

Two of them had stopped working unnoticed: ``bench_spool_cost.py`` retried forever against a
collection without what the coverage ledger calls, and ``bench_spool_framing.py`` called stream
worker classes that a re-layout had replaced. Each script runs here at its smallest size in a
fresh interpreter and must finish with its figures printed; no figure is judged (benchmarks print
figures, tests never time anything). The payload-driven ones (`bench/run.py`, `bench_store.py`)
are exercised by `make bench`; `steady.py` runs here with a small payload of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.awake import kept_awake

# ~3.5 min of test time together: their own target, run by CI (make test stays within 10 min)
pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_probe_prints_both_probes(tmp_path: Path) -> None:
    out = run_script("bench/probe.py", "--pages", "--dir", str(tmp_path), "--mb", "4")
    assert re.search(r"orjson.loads \+ bson.encode: [\d.]+ µs", out)
    for case in ("new file", "over cached pages", "new file after a delete"):
        assert re.search(rf"page cache, {case} +: +[\d.]+ µs", out), out
    assert list(tmp_path.iterdir()) == []  # its files are gone


def test_status_write_prints_each_way(tmp_path: Path) -> None:
    out = run_script("bench/status_write.py", "--writes", "3", "--pause", "0",
                     "--dir", str(tmp_path))
    for way in ("replace", "exchange", "spare", "in place"):
        assert re.search(rf"^  {way} +-?\d+\.\d µs of CPU a write$", out, re.M), out
    assert not list(tmp_path.iterdir())  # its folder removed


def test_spool_cost_stores_every_tweet_in_each_case(tmp_path: Path) -> None:
    out = run_script("bench/bench_spool_cost.py", "--tweets", "300", "--dir", str(tmp_path))
    for case in ("baseline (list)", "spool on tmpfs", "spool on disk"):
        assert re.search(rf"{re.escape(case)} .*stored 300\)", out), out


def test_spool_framing_runs_every_case(tmp_path: Path) -> None:
    out = run_script("bench/bench_spool_framing.py", "--mb", "1", "--rounds", "1",
                     "--dir", str(tmp_path))
    figures = re.findall(r"^(.+?) +this +([\d.]+) µs$", out, re.MULTILINE)
    assert len(figures) == 8, out
    assert sum(title.startswith("stream worker") for title, _ in figures) == 3


@pytest.mark.parametrize("script", ["tweet_steps.py", "encode_routes.py"])
def test_per_tweet_steps_run(script: str) -> None:
    out = run_script(f"bench/{script}", "--rounds", "1", "--passes", "1")
    assert re.search(r"orjson.*bson.encode.* [\d.]+", out), out


def test_slices_prints_every_case_in_each_round() -> None:
    out = run_script("bench/slices.py", "--rounds", "2", "--tweets", "100")
    header = re.search(r"^round +(.+)$", out, re.MULTILINE)
    assert header and header.group(1).count(" ms") == 4, out  # four cases with a gap, one without
    rows = re.findall(r"^(?:\s*\d+|median)((?: +[\d.]+){5})$", out, re.MULTILINE)
    assert len(rows) == 3, out  # two rounds and the medians
    assert all(float(v) > 0 for row in rows for v in row.split()), out


def test_kept_awake_pins_an_idle_busy_loop_to_each_cpu_and_ends_them() -> None:
    """``bench/awake.py``: one SCHED_IDLE loop per CPU while the block runs, none after it."""
    cpus = sorted(os.sched_getaffinity(0))
    with kept_awake() as pids:
        assert len(pids) == len(cpus)
        deadline = time.monotonic() + 30
        # each loop sets its own policy and CPU as it starts: wait until all of them have
        while any(os.sched_getscheduler(pid) != os.SCHED_IDLE for pid in pids):
            assert time.monotonic() < deadline, "a busy loop never became SCHED_IDLE"
            time.sleep(0.01)
        assert [os.sched_getaffinity(pid) for pid in pids] == [{cpu} for cpu in cpus]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
    with kept_awake(enabled=False) as none:
        assert none == []


def test_store_worker_drains_a_paced_spool_as_well_as_a_filled_one(tmp_path: Path) -> None:
    """``bench_store.py --paced``: a writer process feeds the spool while the worker drains it
    (with the vCPUs kept awake, the diagnostic's other half)."""
    out = run_script("bench/bench_store.py", "--paced", "2000", "--append", "100", "--tweets",
                     "1000", "--repeats", "1", "--payload-tweets", "2000", "--cache",
                     str(tmp_path), "--keep-awake", timeout=240)
    assert "kept awake" in out, out
    rows = re.findall(r"in-process +(fed at [\d,]+/s)?: +([\d,]+) tweets/s +([\d.]+) µs", out)
    # each line is printed once all 1,000 tweets were stored (bench_store raises otherwise)
    assert [fed for fed, _, _ in rows] == ["", "fed at 2,000/s"], out
    assert all(float(us) > 0 for _, _, us in rows), out


def test_matching_check_finds_no_difference() -> None:
    out = run_script("bench/check_matching.py", "--cases", "300")
    assert re.search(r"checked against the token model: 0 differences", out), out


def test_inflate_measures_every_library_and_the_inflater_at_each_read_size(tmp_path: Path
                                                                             ) -> None:
    # Each route must give back exactly the plain body's bytes (the script checks) and a figure.
    out = run_script("bench/inflate.py", "--payload-tweets", "600", "--tweets", "600",
                     "--reads", "430,65536", "--rounds", "1", "--cache", str(tmp_path))
    rows = re.findall(r"^\| ([\w -]+) \| ([\d.]+) \([\d.]+×\) \| ([\d.]+) \([\d.]+×\) \|$",
                      out, re.M)
    assert {"zlib", "zlib-ng", "ingestd Inflater"} <= {name for name, _, _ in rows}, out
    assert all(float(a) > 0 and float(b) > 0 for _, a, b in rows), out


def test_inflate_trees_measures_each_tree_at_each_split() -> None:
    out = run_script("bench/inflate_trees.py", str(ROOT), str(ROOT), "--rounds", "1", "--passes",
                     "1", "--reads", "65536")
    rows = re.findall(r"^\| (\S+) \| ([\d.]+) / [\d.]+ \| ([\d.]+) / [\d.]+ \|$", out, re.M)
    assert len(rows) == 2 and all(float(a) > 0 and float(b) > 0 for _, a, b in rows), out


def test_steady_rates_store_tweets_with_and_without_the_child(tmp_path: Path) -> None:
    """The real daemon at a steady rate (a small payload of its own, 1 s windows), then the
    pipeline contender on the same paced stream."""
    out = run_script("bench/steady.py", "--rates", "300", "--encoder", "auto,false",
                     "--seconds", "1", "--warmup", "1", "--repeats", "1", "--pipeline",
                     "--payload-tweets", "2000", "--cache", str(tmp_path), timeout=240)
    rows = re.findall(r"encoder_process (\w+) +stored +([\d,]+)/s +CPU +[\d.]+ µs/tweet", out)
    assert [mode for mode, _ in rows] == ["auto", "false"], out
    assert all(int(rate.replace(",", "")) > 0 for _, rate in rows), out
    piped = re.findall(r"pipeline \(threaded\) +stored +([\d,]+)/s +CPU +([\d.]+) µs/tweet", out)
    assert len(piped) == 1 and float(piped[0][1]) > 0, out
    # paced: it cannot store faster than the 300/s it was sent (give or take its clock's edges)
    assert 0 < int(piped[0][0].replace(",", "")) < 450, out


def test_prespool_contender_stores_every_tweet(tmp_path: Path) -> None:
    """The prototype contender's stand-in for ``EncoderSplit`` (bench/prespool.py) keeps up with
    what the store worker calls on it: it once crash-looped at the first insert, unnoticed, as
    ``make bench`` runs it only on request."""
    work = tmp_path / "work"
    out = run_script("bench/run.py", "--contenders", "prespool", "--payload-tweets", "2000",
                     "--tweets", "2000", "--repeats", "1", "--encodings", "plain",
                     "--skip", "latency,overload,standin,quiet,profile", "--results", "",
                     "--cache", str(tmp_path / "cache"), "--workdir", str(work), timeout=240)
    assert re.search(r"\| prespool \| plain \| [\d,]+ \|", out), out
    # a crashing store worker is restarted and re-inserts its batch: the count alone can pass
    exits = [json.loads(line) for log in work.glob("*/daemon.log")
             for line in log.read_text().splitlines() if '"worker_exited"' in line]
    assert exits and all(e["exit_code"] == 0 for e in exits), exits


def test_steady_rate_runs_both_in_each_round_and_reports_the_median(tmp_path: Path) -> None:
    """``make bench``'s steady-rate run (latency and goal 2's CPU figure): each round runs ingestd
    and the pipeline; the reported CPU is the median of the rounds, all of which are listed."""
    out = run_script("bench/run.py", "--repeats", "0", "--payload-tweets", "2000",
                     "--latency-rate", "400", "--latency-seconds", "2", "--steady-rounds", "3",
                     "--skip", "overload,standin,quiet,profile", "--results", "",
                     "--cache", str(tmp_path / "cache"), "--workdir", str(tmp_path / "work"),
                     timeout=300)
    rounds = re.findall(r"steady round (\d): ingestd ([\d.]+) µs/tweet, pipeline ([\d.]+), "
                        r"p99 ([\d.]+) s", out)
    assert [r[0] for r in rounds] == ["1", "2", "3"], out
    line = re.search(r"over ([\d,]+) tweets in 3 runs at 400/s: .*\*\*p99 ([\d.]+) s\*\* "
                     r"\(by run: ([\d., ]+)\).* median of the runs \*\*([\d.]+) µs/tweet\*\* "
                     r"\(by run: ([\d., ]+);.*pipeline.*: ([\d.]+) µs/tweet \(by run: "
                     r"([\d., ]+)\); .*run by run: ([\d., ]+)$", out, re.M)
    assert line, out
    count, p99, p99s, cpu, cpus, pipe, pipes, ratios = line.groups()
    assert int(count.replace(",", "")) == 3 * 800  # every tweet of every run acknowledged
    as_floats = [[float(v) for v in part.split(", ")] for part in (p99s, cpus, pipes, ratios)]
    assert all(len(values) == 3 for values in as_floats), line.group(0)
    p99_by_run, cpu_by_run, pipe_by_run, ratio_by_run = as_floats
    assert [float(r[1]) for r in rounds] == cpu_by_run
    assert float(cpu) == sorted(cpu_by_run)[1] and float(pipe) == sorted(pipe_by_run)[1]
    assert min(p99_by_run) <= float(p99) <= max(p99_by_run)  # pooled over the runs
    assert ratio_by_run == [round(a / b, 2) for a, b in zip(cpu_by_run, pipe_by_run,
                                                            strict=True)]


def test_pairs_runs_both_trees_in_each_round_and_prints_the_paired_ratio(tmp_path: Path) -> None:
    """Two rounds of one small burst per tree (this tree twice): each round names its order, both
    rates and their ratio, and the summary's ratio is the rounds' (figures are not judged)."""
    out = run_script("bench/pairs.py", "--b", str(ROOT), "--rounds", "2", "--tweets", "2000",
                     "--payload-tweets", "2000", "--cache", str(tmp_path), timeout=300)
    rounds = re.findall(r"round +\d+ \(([AB]) first\): A +([\d,]+)/s .* B +([\d,]+)/s .* "
                        r"B/A ([\d.]+)", out)
    assert [r[0] for r in rounds] == ["A", "B"], out  # the order swaps
    ratios = []
    for _, a, b, ratio in rounds:
        ratios.append(int(b.replace(",", "")) / int(a.replace(",", "")))
        assert abs(ratios[-1] - float(ratio)) < 0.001, out
    mean = re.search(r"paired ratio B/A median ([\d.]+), mean ([\d.]+) over 2 rounds", out)
    assert mean and abs(float(mean.group(2)) - sum(ratios) / 2) < 0.001, out


def test_timeline_shows_the_cores_of_each_process_during_a_burst(tmp_path: Path) -> None:
    """The real daemon on one small burst: a row per step, every tweet acknowledged, the mean
    cores while the stream worker read, and the machine's total past the daemon's."""
    out = run_script("bench/timeline.py", "--tweets", "2000", "--payload-tweets", "2000",
                     "--interval", "0.05", "--cache", str(tmp_path), timeout=240)
    rows = re.findall(r"acked +([\d,]+) .* stream ([\d.]+) +store ([\d.]+) .* total ([\d.]+)"
                      r" +\| +sink ([\d.]+) +bench ([\d.]+) +machine ([\d.]+)", out)
    assert rows and int(rows[-1][0].replace(",", "")) == 2000, out
    assert any(float(row[2]) > 0 for row in rows), out  # the store worker's CPU shows
    assert any(float(row[5]) > 0 for row in rows), out  # the payload server's sends show
    for *_, total, sink, bench, machine in rows:  # printed to 2 decimals each
        assert abs(float(total) + float(sink) + float(bench) - float(machine)) <= 0.02, out
    assert re.search(r"^2,000 tweets in [\d.]+ s", out, re.M), out
    assert "mean cores while the stream worker reads" in out, out
