"""The harness's own check: ``RuntimeProcess.leftovers`` names what a runtime left behind (so the fixtures that
assert it is empty can fail)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil

from coordinator.runtime_process import RuntimeProcess
from shm.segment import Segment, segment_name


def test_leftovers_lists_live_processes_segments_and_the_run_directory(tmp_path: Path) -> None:
    rt = RuntimeProcess.__new__(RuntimeProcess)  # the bookkeeping of a started runtime, without starting one
    survivor = subprocess.Popen(["sleep", "30"])
    segment = Segment.create(segment_name("leftovers-test", "table"), 4096)
    try:
        rt.root, rt.run_id = tmp_path, "leftovers-test"
        rt.children, rt.former = {"loader": psutil.Process(survivor.pid)}, []
        (tmp_path / "promoe-run-leftovers-test").mkdir()
        left = rt.leftovers(grace_s=0.2)
        assert f"process {survivor.pid}" in left
        assert f"segment /dev/shm/{segment.name}" in left
        assert any(item.startswith("run directory") for item in left)
    finally:
        survivor.kill()
        survivor.wait()
        segment.close()
        segment.unlink()
    (tmp_path / "promoe-run-leftovers-test").rmdir()
    assert rt.leftovers(grace_s=0.2) == []
