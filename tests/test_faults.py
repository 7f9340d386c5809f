"""A dead process is noticed: the supervisor stops the whole runtime and nothing is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import time

import psutil
import pytest

from protocol.config import SEGMENTS
from shm.segment import leftover_segments
from tests.runtime import ROLES


@pytest.mark.parametrize("role", ROLES)
def test_kill_9_of_a_worker_stops_the_runtime_cleanly(runtime_factory, role):
    rt = runtime_factory("--policy", "lru", "--cache-experts", "24")
    rt.kill_worker(role)
    code = rt.wait_exit(timeout_s=30)
    assert code == 1, f"launch.py should report the dead {role} with exit code 1, got {code}"
    assert f"{role} (pid" in rt.log() and "exited with code -9" in rt.log()
    rt.assert_nothing_left()


def test_sigterm_stops_the_runtime_cleanly(runtime):
    with runtime.client() as client:
        assert client.generate(prompt_ids=[1, 2, 3], max_new_tokens=2).token_ids
    assert runtime.stop() == 0
    runtime.assert_nothing_left()


def test_kill_9_of_the_launcher_leaves_no_process_and_no_segment(runtime_factory):
    """Workers die with the supervisor (PDEATHSIG); the segments' creator is gone, its resource tracker unlinks."""
    rt = runtime_factory("--policy", "lru", "--cache-experts", "24")
    assert sorted(leftover_segments(rt.run_id)) == sorted(f"promoe_{rt.run_id}_{what}" for what in SEGMENTS)
    os.kill(rt.proc.pid, signal.SIGKILL)
    rt.proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while leftover_segments(rt.run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover_segments(rt.run_id) == []
    for role, child in rt.children.items():
        try:
            child.wait(timeout=10)
        except psutil.TimeoutExpired as exc:
            raise AssertionError(f"{role} outlived its supervisor") from exc
    for run_dir in rt.root.glob("promoe-run-*"):  # the supervisor could not remove it; the test does
        shutil.rmtree(run_dir)
