"""``bench/gpu_check.sh --rehearse``: the prepared GPU check's very steps on the CPU at tiny dimensions, so that the
script cannot rot before a GPU runs it: environment report, ``pytest -m gpu`` (all skipped here), the benchmark with
both routing sources and every row (one runtime start per source, reconfigured per row), the output folder as the
device tool brings it back, and the table printed last."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.25, 0.5)
"""The rehearsal's cache fractions (the GPU run adds 12.5%)."""
ABLATION = ("ablation: prefetch only", "ablation: + early preemption", "ablation: + reordering")


@pytest.mark.timeout(600)
def test_the_gpu_check_rehearsal_writes_every_row_exactly_into_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(PROJECT_ROOT / "bench" / "gpu_check.sh"), "--rehearse", "--out", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=580,
                          env={**os.environ, "PYTHON": sys.executable})
    log = done.stdout
    bench_log = (out / "bench.log").read_text() if (out / "bench.log").exists() else ""
    assert done.returncode == 0, log[-6000:] + bench_log[-4000:]

    # what the device tool brings back: at most 8 plain files, simple names, nothing deep, each under 16 MB
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.name for p in files}
    expected = {"check.log", "pytest.log", "bench.log", "runtime.log", "gpu-cpu-rehearsal.json",
                "gpu-cpu-rehearsal.txt"} | ({"gpu-cpu-rehearsal.png"} if find_spec("matplotlib") else set())
    assert names == expected
    assert len(files) <= 8 and all(p.parent == out for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size < 16 << 20 for p in files)

    for phase in ("install", "environment", "pytest -m gpu", "benchmark"):
        assert re.search(rf"==== phase {re.escape(phase)} took \d+ s", log), phase
    assert re.search(r"\d+ skipped", (out / "pytest.log").read_text()), "pytest -m gpu ran (and skipped: no CUDA)"

    report = json.loads((out / "gpu-cpu-rehearsal.json").read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["device"] == "cpu" and meta["skipped"] == [] and set(meta["routing"]) == {"synthetic", "trace"}
    assert meta["wall_s"] <= meta["budget_s"]
    for source in ("synthetic", "trace"):
        mine = {(r["policy"], r["cache_fraction"]): r for r in rows if r["routing"] == source}
        wanted = {("all_resident", 1.0), ("transformers", 1.0)}
        wanted |= {(p, f) for p in ("promoe", "lru", "lfu", "ondemand", "belady (floor)") for f in FRACTIONS}
        wanted |= {("lru + host", 0.25), ("promoe + host", 0.25)}
        if source == "synthetic":
            wanted |= {(a, 0.25) for a in ABLATION}
        assert set(mine) == wanted, source
        hosted = {r["policy"] for r in mine.values() if r.get("configured", {}).get("host_compute") == "auto"}
        assert hosted == {"lru + host", "promoe + host"}, "host compute only in its rows"
        measured = [r for r in mine.values() if r["policy"] != "belady (floor)"]
        assert all(r["exact"] is True for r in measured), "the runtime must match transformers token for token"
        runtime = [r for r in measured if r["policy"] != "transformers"]
        assert all(r["metrics_cache_experts"] == r["cache_experts"] for r in runtime), "configure_cache applied"
        assert mine[("all_resident", 1.0)]["hit_rate"] == 1.0
        assert all(r["bytes_loaded"] > 0 for r in runtime if r["policy"] != "all_resident")
        assert all(r["belady_bytes"] > 0 and r["vs_floor"] > 0 for r in runtime if r["policy"] != "all_resident")
        promoe = mine[("promoe", 0.25)]
        if source == "synthetic":
            assert promoe["goodpred"] is not None and promoe["predictor"] == "learned"
        else:  # no skip-layer gate reuse on replayed routing: nothing is predicted at all
            assert promoe["goodpred"] is None and promoe["predictor"] == "none: gates only"
        assert 0 < mine[("belady (floor)", 0.25)]["hit_rate"] <= 1
    stats = meta["routing"]["synthetic"]
    assert 0 < stats["learned_predictor_accuracy_d2"] <= 1 and 0 < stats["skip_layer_gate_accuracy_d2"] <= 1

    table = (out / "gpu-cpu-rehearsal.txt").read_text().strip().splitlines()
    assert log.strip().splitlines()[-len(table):] == table, "the table is printed last"
    assert (out / "check.log").read_text().strip().splitlines()[-len(table):] == table


def test_rows_run_most_important_first_and_the_floor_counts_only_measured_accesses() -> None:
    from bench.gpu import row_configs
    from bench.offload import belady_misses

    rows = [(r.label, r.cache_fraction) for r in row_configs("synthetic", (0.125, 0.25, 0.5), predicting=True)]
    assert rows[:4] == [("all_resident", 1.0), ("promoe", 0.25), ("lru", 0.25), ("promoe", 0.5)]
    assert rows[4:8] == [("lru + host", 0.25), ("promoe + host", 0.25), ("lfu", 0.25), ("ondemand", 0.25)]
    assert rows[-3:] == [(a, 0.25) for a in ABLATION]
    assert len(rows) == len(set(rows)) == 1 + 4 * 3 + 2 + 3
    trace = row_configs("trace", (0.125, 0.25, 0.5), predicting=False)
    assert not any(r.label.startswith("ablation") for r in trace)
    assert all(not r.prefetch for r in trace if r.policy == "promoe"), "never predict on replayed routing"
    accesses = [{1, 2}, {3}, {1, 2}]
    assert belady_misses(accesses, capacity=3) == 3
    assert belady_misses(accesses, capacity=3, count_from=2) == 0, "the warm-up's accesses warm the cache"
    assert belady_misses(accesses, capacity=2, count_from=1) == 2
