"""torch's shared-memory files (``/dev/shm/torch_<pid>_*``: on the CUDA path the IPC reference counters of the
inference worker's exported slots) do not outlive the runtime, also when a worker was killed with ``kill -9``.

No GPU here: the file a killed worker would leave is created by the test under the worker's pid, exactly as torch
names it (``at::NewProcessWideShmHandle``: ``/torch_<pid>_<random>_<counter>``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.supervisor import Supervisor
from protocol.config import RuntimeConfig
from shm.segment import SHM_DIR, torch_files_of, unlink_torch_files
from tests.test_loader import LAYOUT


def torch_file(pid: int, counter: int = 0) -> Path:
    path = SHM_DIR / f"torch_{pid}_{uuid.uuid4().int % 10**9}_{counter}"
    path.write_bytes(b"\0" * 8 * 128)  # torch's CUDA IPC reference-counter file: 128 int64 counters
    return path


def killed_worker() -> subprocess.Popen:
    """A process that stands in for a worker and dies by SIGKILL (reaped, as the supervisor reaps its children)."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert child.stdin is not None
    child.stdin.close()
    return child


@pytest.fixture
def files() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in made:
        path.unlink(missing_ok=True)


def test_only_the_files_of_gone_processes_named_are_removed(files: list[Path]) -> None:
    dead = killed_worker()
    files += [torch_file(dead.pid, 0), torch_file(dead.pid, 1)]
    alive = torch_file(os.getpid())  # a live process: its files are in use
    files.append(alive)
    prefix_of_another = torch_file(int(f"{dead.pid}7"))  # torch_<pid>7_...: another pid, same digits first
    files.append(prefix_of_another)
    assert torch_files_of([dead.pid]) == sorted(p.name for p in files[:2])
    assert sorted(unlink_torch_files([dead.pid, os.getpid()])) == sorted(p.name for p in files[:2])
    assert not files[0].exists() and not files[1].exists()
    assert alive.exists() and prefix_of_another.exists()


@pytest.mark.timeout(60)
def test_shutdown_removes_torch_files_of_a_worker_killed_with_kill_9(tmp_path: Path, files: list[Path]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = RuntimeConfig(run_id=f"test_{uuid.uuid4().hex[:12]}", run_dir=str(run_dir), checkpoint="", layout=LAYOUT,
                        policy="lru", device="cuda", bind="", link_gbps=None, lookahead=1, predictor_path=None,
                        load_timeout_s=1.0, supervisor_pid=os.getpid())
    supervisor = Supervisor(cfg)
    first, restarted = killed_worker(), killed_worker()  # an inference worker killed, then its successor too
    for child in (first, restarted):
        supervisor.child_pids.append(child.pid)
        files.append(torch_file(child.pid))
    supervisor.children["inference"] = restarted
    not_ours = torch_file(os.getpid())
    files.append(not_ours)
    supervisor.shutdown("test")
    assert torch_files_of([first.pid, restarted.pid]) == [], "a killed worker's torch files outlived the runtime"
    assert not_ours.exists(), "only the runtime's own workers' files are removed"
    assert not run_dir.exists()
