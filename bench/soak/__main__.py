"""``python -m bench.soak [outage|kills|corrupt|reloads|hour ...]``: run proofs, print tables.

Every figure scales with environment variables (see each proof's ``run``), so a smoke run is e.g.
``SOAK_OUTAGE_SECONDS=20 SOAK_KILLS=10 python -m bench.soak outage kills``. Exit status 1 if any
proof found a problem.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

from bench.soak.common import Summary, say

PROOFS = ("outage", "kills", "corrupt", "reloads", "hour")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("proofs", nargs="*", help=f"any of {', '.join(PROOFS)} (default: all)")
    parser.add_argument("--workdir", type=Path, help="keep the run's files here (default: tmp)")
    args = parser.parse_args()
    unknown = set(args.proofs) - set(PROOFS)
    if unknown:
        parser.error(f"unknown proof(s) {sorted(unknown)}; known: {', '.join(PROOFS)}")
    summaries: list[Summary] = []
    for name in args.proofs or PROOFS:
        with tempfile.TemporaryDirectory(prefix=f"soak-{name}-") as tmp:
            work = (args.workdir / name) if args.workdir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            say(f"[soak] {name}: starting in {work}")
            module = importlib.import_module(f"bench.soak.{name}")
            summary: Summary = module.run(work)
            summary.print()
            summaries.append(summary)
    return 1 if any(s.problems for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
