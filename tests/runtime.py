"""Test harness: a whole runtime (``launch.py`` and its four processes) started as a user would start it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from coordinator.auth import ClientKeys
from coordinator.client import PromoeClient
from shm.segment import leftover_segments, torch_files_of

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ROLES = ("coordinator", "inference", "predictor", "loader")


class RuntimeProcess:
    """``python launch.py`` serving on an ``ipc://`` socket under ``root``."""

    def __init__(self, root: Path, checkpoint: Path, *extra: str, ready_timeout_s: float = 120.0,
                 curve: ClientKeys | None = None, address: str | None = None) -> None:
        self.root = root
        self.curve = curve
        """Keys of the harness's own client when the runtime runs with --curve-keys."""
        root.mkdir(parents=True, exist_ok=True)
        self.address = address or f"ipc://{root / 'client.sock'}"
        self.log_path = root / "runtime.log"
        # the CPU path unless a test asks for cuda: on a GPU machine launch.py would otherwise default to cuda, and
        # the CPU oracle compares against float32 transformers
        device = [] if "--device" in extra else ["--device", "cpu"]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "launch.py"), "--model-path", str(checkpoint), "--bind", self.address,
             "--run-root", str(root), "--ready-timeout-s", str(ready_timeout_s), *device, *extra],
            cwd=PROJECT_ROOT, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.children: dict[str, psutil.Process] = {}
        self.former: list[psutil.Process] = []
        """Processes of roles that were restarted since."""
        self.run_id: str | None = None
        self.roles = (*ROLES, "gateway") if "--http" in extra else ROLES
        """The processes to find: the gateway too when it serves HTTP."""
        self.http = extra[extra.index("--http") + 1] if "--http" in extra else None
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready = every worker answers the coordinator's pings (each answers only once it serves)."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"launch.py exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"runtime not ready within {timeout_s} s:\n{self.log()}")
                try:
                    health = client.health(timeout_s=1.0)
                except TimeoutError:
                    continue
                if all(health.workers.values()) and self._http_ready():
                    break
                time.sleep(0.2)
        self.find_children()
        (config,) = self.root.glob("promoe-run-*/runtime.json")
        self.run_id = json.loads(config.read_text())["run_id"]

    def _http_ready(self) -> bool:
        """With ``--http``: the gateway answers ``/health`` with 200 (it reports ready once its port is bound)."""
        if self.http is None:
            return True
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.http}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def find_children(self) -> None:
        """The current process of each role (again after a restart: every process ever seen stays checked)."""
        self.former.extend(self.children.values())
        self.children = {}
        for child in psutil.Process(self.proc.pid).children(recursive=False):
            title = " ".join(child.cmdline())
            for role in self.roles:
                if title.startswith(f"promoe::{role}"):
                    self.children[role] = child
        assert sorted(self.children) == sorted(self.roles), f"children found: {self.children}"

    def wait_restarted(self, role: str, restarts: int, timeout_s: float = 90.0) -> None:
        """Until the coordinator counts ``restarts`` restarts of ``role`` and the new process answers pings."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                health = client.health(timeout_s=5.0)
                if health.restarts.get(role, 0) >= restarts and health.workers[role]:
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{role} not restarted {restarts} time(s) within {timeout_s} s "
                                         f"(health: {health}):\n{self.log()}")
                time.sleep(0.1)
        self.find_children()

    def client(self, timeout_s: float = 120.0) -> PromoeClient:
        return PromoeClient(self.address, timeout_s=timeout_s, curve=self.curve)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill_worker(self, role: str) -> None:
        os.kill(self.children[role].pid, signal.SIGKILL)

    def wait_exit(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._log.close()
        return code

    def assert_nothing_left(self) -> None:
        """No child process, no shared-memory segment and no torch file in /dev/shm of this runtime survives it."""
        deadline = time.monotonic() + 5
        alive = []
        while time.monotonic() < deadline:
            alive = [f"{p.pid}" for p in [*self.children.values(), *self.former]
                     if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(0.1)
        assert not alive, f"processes left behind: {alive}\n{self.log()}"
        pids = [p.pid for p in [*self.children.values(), *self.former]]
        assert torch_files_of(pids) == [], f"torch files left in /dev/shm:\n{self.log()}"
        if self.run_id is not None:
            assert leftover_segments(self.run_id) == [], f"segments left in /dev/shm:\n{self.log()}"
        assert not list(self.root.glob("promoe-run-*")), "run directory left behind"
