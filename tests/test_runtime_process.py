"""The harness's own checks: ``RuntimeProcess.leftovers`` names what a runtime left behind (so the fixtures that
assert it is empty can fail); the gateway's address is found in ``--http HOST:PORT`` and ``--http=HOST:PORT``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil

from coordinator.runtime_process import RuntimeProcess, http_address
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


def test_the_gateway_address_is_found_in_both_forms_of_the_flag() -> None:
    assert http_address(["--policy", "lru", "--http", "127.0.0.1:8000", "--http-max-inflight", "3"]) == "127.0.0.1:8000"
    assert http_address(["--http=[::1]:8001", "--http-max-inflight=3"]) == "[::1]:8001"
    assert http_address(["--http", "127.0.0.1:1", "--http=127.0.0.1:2"]) == "127.0.0.1:2"  # the last, as argparse
    assert http_address(["--http-max-inflight", "3", "--policy", "lru"]) is None
    assert http_address(["--http"]) is None  # no value: launch.py itself refuses it
