"""Each soak proof of ``make soak`` (bench/soak, docs/reliability.md §9) runs at a smoke size.

The proofs are never part of ``make test`` at full size (~2 h). Two of them had stopped working
unnoticed while the daemon changed under them: the kill proof waited forever for an encoder child
that ``writer.encoder_process: auto`` no longer starts behind a held reply, and the corruption
oracle read the spool's coverage markers as tweets. Here each proof runs in a fresh interpreter
at its smallest useful size and must end with exit 0 and its verdict PASS: the proof's own
reconciliation against the simulator's ground truth (delivered = stored + deleted + counted
losses, nothing stored twice). The hour's trend verdicts are not judged here (a leak needs minutes
to show: SOAK_HOUR_JUDGE_TRENDS=0); its reconciliation is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# ~3.5 min of test time together: their own target, run by CI (make test stays within 10 min)
pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "outage": {"SOAK_OUTAGE_SECONDS": "5", "SOAK_OUTAGE_PRINT_EVERY": "5"},
    "kills": {"SOAK_KILLS": "4", "SOAK_SEED": "7"},  # one kill of each target
    "corrupt": {"SOAK_CORRUPTIONS": "16", "SOAK_DAEMON_EVERY": "8", "SOAK_SEED": "7"},
    "reloads": {"SOAK_RELOADS": "3"},
    "hour": {"SOAK_HOUR_SECONDS": "40", "SOAK_HOUR_FAULT_EVERY": "10",
             "SOAK_HOUR_SAMPLE_EVERY": "10", "SOAK_HOUR_JUDGE_TRENDS": "0"},
}


@pytest.mark.parametrize("proof", list(SIZES))
def test_soak_proof_passes_at_smoke_size(proof: str, tmp_path: Path) -> None:
    env = {**os.environ, **SIZES[proof]}
    proc = subprocess.run([sys.executable, "-m", "bench.soak", proof, "--workdir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert "verdict: PASS" in out, out[-4000:]
    row = re.search(rf"^\| {proof} \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", out,
                    re.MULTILINE)
    assert row, out[-4000:]
    delivered, stored, _, _, _, lost = map(int, row.groups())
    assert delivered > 0 and stored > 0 and lost == 0, row.group(0)
