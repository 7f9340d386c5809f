"""``--stand-in-cores``: the inference worker alone on one core with one torch thread, every other process of the
runtime on the remaining cores (the CPU stand-in's model of a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import stand_in_core
from protocol.config import RuntimeConfig
from shm.layout import ExpertLayout

CORES = sorted(os.sched_getaffinity(0))
ROLES = ("inference", "loader", "predictor", "coordinator")


def placed(inference_core: int | None, tmp_path: Path, compute_threads: int | None = None) -> dict[str, dict]:
    """Write the config to a run directory, read it in a fresh process and, for each role in turn (from the cores
    the process started with), ``place(role)``: the cores and torch threads each role got (threads: None if the
    role did not need torch)."""
    layout = ExpertLayout(moe_layers=(0,), experts_per_layer=4, top_k=2, hidden_size=8, intermediate_size=4,
                          n_slots=2, n_chunks=1, storage_dtype="float32", compute_dtype="float32")
    cfg = RuntimeConfig(run_id="x", run_dir=str(tmp_path), checkpoint="none", layout=layout, policy="lru",
                        device="cpu", bind="ipc://none", link_gbps=None, lookahead=1, predictor_path=None,
                        load_timeout_s=1.0, supervisor_pid=os.getpid(), inference_core=inference_core,
                        compute_threads=compute_threads)
    cfg.write()
    code = f"""
import json, os, sys
from protocol.config import RuntimeConfig
cfg, start, out = RuntimeConfig.read({str(tmp_path)!r}), os.sched_getaffinity(0), {{}}
for role in {ROLES!r}:
    os.sched_setaffinity(0, start)
    cfg.place(role)
    threads = sys.modules['torch'].get_num_threads() if 'torch' in sys.modules else None
    out[role] = {{'cores': sorted(os.sched_getaffinity(0)), 'threads': threads}}
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout)


@pytest.mark.skipif(len(CORES) < 2, reason="needs two usable cores")
def test_the_inference_worker_gets_its_core_alone_and_one_thread(tmp_path: Path) -> None:
    core = stand_in_core(True, "cpu")
    assert core == CORES[0]
    roles = placed(core, tmp_path)
    assert roles["inference"] == {"cores": [core], "threads": 1}
    for role in ROLES[1:]:
        assert roles[role]["cores"] == CORES[1:]


def test_no_placement_leaves_every_process_where_it_was(tmp_path: Path) -> None:
    assert stand_in_core(False, "cpu") is None
    assert all(r["cores"] == CORES for r in placed(None, tmp_path).values())


def test_the_inference_worker_leaves_a_core_to_the_others_unless_told(tmp_path: Path) -> None:
    """Without placement the inference worker computes with torch's default threads but at most one fewer than the
    cores (at least one), or with ``--compute-threads``; the stand-in with one."""
    import torch

    assert placed(None, tmp_path)["inference"]["threads"] == max(1, min(torch.get_num_threads(), len(CORES) - 1))
    assert placed(None, tmp_path, compute_threads=3)["inference"]["threads"] == 3
    assert placed(CORES[0], tmp_path, compute_threads=3)["inference"]["threads"] == 1  # the stand-in: one


def test_compute_threads_must_be_positive() -> None:
    from launch import build_parser, check_serving_flags

    args = build_parser().parse_args(["--compute-threads", "0"])
    assert "--compute-threads must be >= 1" in (check_serving_flags(args, "ipc:///x") or "")
    args = build_parser().parse_args(["--compute-threads", "2", "--stand-in-cores"])
    assert "--stand-in-cores computes with one thread" in (check_serving_flags(args, "ipc:///x") or "")


def test_stand_in_cores_is_refused_on_a_gpu() -> None:
    with pytest.raises(SystemExit, match="needs the CPU device"):
        stand_in_core(True, "cuda")
