"""The parent's view of a whole runtime: ``launch.py`` and its processes started as a user would start them.

The tests and the benchmarks start, watch and stop runtimes through this one class: it waits until every worker
answers, finds each role's process (again after a restart), kills one on request, stops the runtime through its one
shutdown path (SIGTERM, then SIGKILL past a deadline) and lists whatever the runtime left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from coordinator.auth import ClientKeys
from coordinator.client import PromoeClient
from protocol.config import GATEWAY, ROLES
from shm.segment import leftover_segments, torch_files_of

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def http_address(args: Sequence[str]) -> str | None:
    """The ``HOST:PORT`` of ``--http HOST:PORT`` or ``--http=HOST:PORT`` among ``launch.py``'s arguments (the last
    one given, as argparse takes it); None without ``--http``."""
    address = None
    for i, arg in enumerate(args):
        if arg == "--http" and i + 1 < len(args):
            address = args[i + 1]
        elif arg.startswith("--http="):
            address = arg[len("--http="):]
    return address


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
        self.http = http_address(extra)
        """The gateway's ``HOST:PORT`` (None: no ``--http``)."""
        self.roles = (*ROLES, GATEWAY) if self.http is not None else ROLES
        """The processes to find: the gateway too when it serves HTTP."""
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
            if title.startswith("promoe::"):
                self.children[title.removeprefix("promoe::").split()[0]] = child
        missing = sorted(set(self.roles) - set(self.children))
        if missing:
            raise RuntimeError(f"no process of role(s) {missing} under launch.py (found {sorted(self.children)})")

    def wait_restarted(self, role: str, restarts: int, timeout_s: float = 90.0) -> None:
        """Until the coordinator counts ``restarts`` restarts of ``role`` and the new process answers pings."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                health = client.health(timeout_s=5.0)
                if health.restarts.get(role, 0) >= restarts and health.workers[role]:
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError(f"{role} not restarted {restarts} time(s) within {timeout_s} s "
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

    def leftovers(self, grace_s: float = 5.0) -> list[str]:
        """What this runtime left behind once stopped: live processes (given ``grace_s`` to exit), torch files and
        segments in /dev/shm, its run directory. Empty when it cleaned up after itself."""
        seen = [*self.children.values(), *self.former]
        deadline = time.monotonic() + grace_s
        while True:
            alive = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        left = [f"process {p.pid}" for p in alive]
        left += [f"torch file /dev/shm/{name}" for name in torch_files_of([p.pid for p in seen])]
        if self.run_id is not None:
            left += [f"segment /dev/shm/{name}" for name in leftover_segments(self.run_id)]
        left += [f"run directory {path}" for path in self.root.glob("promoe-run-*")]
        return left
