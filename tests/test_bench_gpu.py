"""``bench/gpu.py --smoke``: the GPU benchmark's whole code path (synthetic checkpoint, routing regimes and their
statistics, predictor training, reference trace, runtime runs, floor, JSON and table) at tiny dimensions on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(420)
def test_gpu_bench_smoke_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(PROJECT_ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out), "--work",
           str(tmp_path / "work"), "--regimes", "skewed", "--cache-fractions", "0.25", "--policies", "promoe",
           "--ablation", "none", "--trace-tokens", "512"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "gpu-cpu-smoke.json").read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["device"] == "cpu" and meta["torch"] and meta["date"] and meta["skipped"] == []
    stats = meta["routing"]["skewed"]
    for key in ("topk_overlap_consecutive", "top_quarter_share", "skip_layer_gate_accuracy_d2",
                "learned_predictor_accuracy_d2"):
        assert 0.0 < stats[key] <= 1.0, (key, stats)
    assert stats["top_quarter_share"] > 0.25, "the skewed regime must concentrate uses on a quarter of the experts"
    assert [(r["policy"], r["cache_experts"]) for r in rows] == [("all_resident", 64), ("promoe", 16)]
    resident, promoe = rows
    assert all(r["exact"] for r in rows), "the runtime must match transformers token for token"
    assert resident["vs_all_resident"] == 1.0 and resident["hit_rate"] == 1.0
    assert promoe["bytes_loaded"] > 0 and promoe["goodpred"] is not None
    assert promoe["belady_bytes"] > 0 and promoe["vs_floor"] > 0
    table = (out / "gpu-cpu-smoke.txt").read_text().strip().splitlines()
    assert done.stdout.strip().splitlines()[-len(table):] == table, "the table is printed last"
