"""The baselines ingestd is measured against, each run as its own process by ``bench/run.py``.

* ``naive``: what users build from the tutorial: ``requests`` + ``iter_lines`` + ``json.loads``
  + ``insert_one`` per tweet.
* ``threaded``: a one-process two-thread pipeline: a pycurl thread frames the body into a
  ``queue.Queue``; the main thread parses with orjson and stores with ``insert_many(ordered=False)``
  in batches of ``--batch``.
* ``tweepy``: tweepy 4's default v1.1 path (``tweepy.Stream``, the last release that has it is
  4.13: ``requests`` ``iter_lines``, ``json.loads`` and a ``Status`` model per tweet in
  ``on_data``), each status's JSON stored with ``insert_many`` in batches of ``--batch``; only the
  URL is pointed at the local server. A bench-only dependency (``pip install -e '.[bench]'``).
* ``floor``: the parse floor: pycurl + ingestd's ``LineFramer`` + ``orjson.loads`` on one thread, no
  insert at all.

Each stops after ``--tweets`` tweets and prints one JSON line: ``first_ns``/``done_ns``
(monotonic: first body byte seen, last tweet acknowledged or parsed), ``cpu`` (seconds of CPU of
the whole process, all threads, between those two moments), ``maxrss_kb``.

    .venv/bin/python bench/contenders.py floor --url URL --tweets 200000 [--gzip]
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import sys
import threading
import time
from typing import Any

import orjson
import pycurl

from ingestd.source.framing import LineFramer

FORM = "track=twitter&stall_warnings=true"


class Window:
    """First byte and completion times, with the process CPU at each."""

    def __init__(self) -> None:
        self.first_ns = 0
        self.first_cpu = 0.0
        self.done_ns = 0
        self.done_cpu = 0.0

    def start(self) -> None:
        if not self.first_ns:
            self.first_ns = time.monotonic_ns()
            self.first_cpu = time.process_time()

    def done(self) -> None:
        self.done_ns = time.monotonic_ns()
        self.done_cpu = time.process_time()

    def report(self, tweets: int, **extra: Any) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({
            "tweets": tweets, "first_ns": self.first_ns, "done_ns": self.done_ns,
            "cpu": round(self.done_cpu - self.first_cpu, 3), "maxrss_kb": usage.ru_maxrss,
            **extra,
        }), flush=True)


def _curl(url: str, gzip: bool, write: Any) -> pycurl.Curl:
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, url)
    curl.setopt(pycurl.POSTFIELDS, FORM)
    curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
    if gzip:
        curl.setopt(pycurl.ACCEPT_ENCODING, "deflate, gzip")
    curl.setopt(pycurl.WRITEFUNCTION, write)
    curl.setopt(pycurl.NOSIGNAL, 1)
    return curl


def _perform(curl: pycurl.Curl) -> None:
    try:
        curl.perform()
    except pycurl.error as exc:
        if exc.args[0] != pycurl.E_WRITE_ERROR:  # 23: we aborted it from the callback
            raise
    finally:
        curl.close()


def run_floor(args: argparse.Namespace) -> None:
    window = Window()
    framer = LineFramer(1_000_000)
    count = 0

    def write(data: bytes) -> int | None:
        nonlocal count
        window.start()
        for item in framer.feed(data):
            if isinstance(item, bytes):
                orjson.loads(item)
                count += 1
        if count >= args.tweets:
            window.done()
            return 0  # abort: the server keeps the stream open
        return None

    _perform(_curl(args.url, args.gzip, write))
    window.report(count)


def run_threaded(args: argparse.Namespace) -> None:
    import pymongo

    window = Window()
    lines: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=1000)
    stop = threading.Event()
    pending = bytearray()

    def write(data: bytes) -> int | None:
        window.start()
        if stop.is_set():
            return 0
        pending.extend(data)
        cut = pending.rfind(b"\r\n")
        if cut >= 0:
            lines.put([line for line in bytes(pending[:cut]).split(b"\r\n") if line])
            del pending[: cut + 2]
        return None

    reader = threading.Thread(target=_perform, args=(_curl(args.url, args.gzip, write),),
                              daemon=True)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(args.mongo)
    coll = client[args.database]["threaded"]
    reader.start()
    stored = 0
    batch: list[dict[str, Any]] = []
    while stored < args.tweets:
        chunk = lines.get()
        if chunk is None:
            break
        for line in chunk:
            batch.append(orjson.loads(line))
            if len(batch) >= args.batch or stored + len(batch) >= args.tweets:
                coll.insert_many(batch, ordered=False)
                stored += len(batch)
                batch = []
                if stored >= args.tweets:
                    break
    window.done()
    stop.set()
    window.report(stored)
    client.close()


def run_naive(args: argparse.Namespace) -> None:
    import json as stdjson

    import pymongo
    import requests

    window = Window()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(args.mongo)
    coll = client[args.database]["naive"]
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if not args.gzip:
        headers["Accept-Encoding"] = "identity"
    stored = 0
    with requests.post(args.url, data=FORM, headers=headers, stream=True, timeout=90) as resp:
        for line in resp.iter_lines():
            window.start()
            if line:
                coll.insert_one(stdjson.loads(line))
                stored += 1
                if stored >= args.tweets:
                    break
    window.done()
    window.report(stored)
    client.close()


def run_tweepy(args: argparse.Namespace) -> None:
    import pymongo
    import tweepy
    from tweepy.streaming import BaseStream

    window = Window()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(args.mongo)
    coll = client[args.database]["tweepy"]
    url = args.url

    class Stream(tweepy.Stream):  # type: ignore[misc]
        stored = 0
        batch: list[dict[str, Any]] = []  # noqa: RUF012 (one instance)

        def _connect(self, method: str, endpoint: str, **kwargs: Any) -> None:
            # tweepy's own _connect with the local URL in place of stream.twitter.com's
            auth = tweepy.streaming.OAuth1(self.consumer_key, self.consumer_secret,
                                           self.access_token, self.access_token_secret)
            BaseStream._connect(self, method, url, auth=auth, timeout=90, **kwargs)

        def on_data(self, raw_data: bytes) -> None:
            window.start()
            super().on_data(raw_data)

        def on_status(self, status: Any) -> None:
            self.batch.append(status._json)
            if len(self.batch) >= args.batch or self.stored + len(self.batch) >= args.tweets:
                coll.insert_many(self.batch, ordered=False)
                self.stored += len(self.batch)
                self.batch = []
                if self.stored >= args.tweets:
                    window.done()
                    self.disconnect()

    stream = Stream("key", "secret", "token", "token-secret")
    if not args.gzip:
        stream.session.headers["Accept-Encoding"] = "identity"
    stream.filter(track=["twitter"], stall_warnings=True)
    window.report(stream.stored)
    client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("naive", "threaded", "tweepy", "floor"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--mongo", default="mongodb://127.0.0.1:27017")
    parser.add_argument("--database", default="bench")
    parser.add_argument("--tweets", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--gzip", action="store_true")
    args = parser.parse_args(argv)
    runs = {"naive": run_naive, "threaded": run_threaded, "tweepy": run_tweepy, "floor": run_floor}
    runs[args.kind](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
