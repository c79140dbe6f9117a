"""Loaded at start-up by every Python process whose PYTHONPATH starts with this folder (the
``prespool`` contender of ``bench/run.py`` runs the daemon so): patches its two workers only (the
supervisor imports nothing more)."""

import os
import sys

if os.environ.get("INGESTD_BENCH_PRESPOOL") == "1" and "--role" in sys.argv:
    from bench.prespool import install

    install()
