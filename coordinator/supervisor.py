"""The supervisor: the ``launch.py`` process. It owns every shared-memory segment, starts the four processes, waits
for each to report ready, watches them, and stops them all through one shutdown path.

Child deaths are seen through pidfds (no polling of ``waitpid``); SIGINT/SIGTERM wake the same poller through the
signal wake-up fd. ``shutdown`` is the only way out: SIGTERM every child, wait with a deadline, SIGKILL what is
left, then unlink every segment and remove the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import zmq

from protocol.codec import MAX_MESSAGE_NBYTES, ProtocolError, decode
from protocol.config import ROLES, RuntimeConfig
from protocol.messages import WorkerStarted
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.hidden_exchange import HiddenExchange
from shm.segment import Segment, unlink_leftovers
from shm.slot_table import SlotTable
from workers.bootstrap import WorkerDead

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    "coordinator": "coordinator.server",
    "inference": "workers.inference",
    "predictor": "workers.predictor",
    "loader": "workers.loader",
}


class Supervisor:
    def __init__(self, cfg: RuntimeConfig, profile_dir: Path | None = None, stop_timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.profile_dir = profile_dir
        self.stop_timeout_s = stop_timeout_s
        self.children: dict[str, subprocess.Popen] = {}
        self.profilers: dict[str, subprocess.Popen] = {}
        self.segments: list[Segment] = []
        self._pidfds: dict[int, str] = {}
        self.stop_signal: int | None = None
        self._stopped = False
        self._ctx = zmq.Context()
        self.recv_from_workers: zmq.Socket | None = None
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)

    # ------------------------------------------------------------ start
    def start(self, ready_timeout_s: float) -> None:
        """Create the segments, start the four processes, and wait until each reports ready."""
        self._install_signal_handlers()
        try:
            self._create_segments()
            self.cfg.write()
            self.recv_from_workers = self._ctx.socket(zmq.PULL)
            self.recv_from_workers.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
            self.recv_from_workers.setsockopt(zmq.LINGER, 0)
            self.recv_from_workers.bind(self.cfg.endpoint("supervisor"))
            for role in ROLES:
                self._spawn(role)
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.shutdown("start-up failed")
            raise

    def _create_segments(self) -> None:
        lay = self.cfg.layout
        store = Segment.create(self.cfg.segment("store"), HostExpertStore.nbytes_for(lay))
        self.segments.append(store)
        slots_nbytes = CacheSlots.nbytes_for(lay)
        if self.cfg.device != "cuda":  # on the CUDA path the slots live in the inference worker's GPU memory
            self.segments.append(Segment.create(self.cfg.segment("slots"), slots_nbytes))
        table = Segment.create(self.cfg.segment("table"), SlotTable.nbytes_for(lay.n_slots, lay.n_experts))
        self.segments.append(table)
        SlotTable(table, lay.n_slots, lay.n_experts, lay.n_chunks, init=True).close()
        self.segments.append(Segment.create(self.cfg.segment("hidden"), HiddenExchange.nbytes_for(
            len(lay.moe_layers), lay.hidden_size, self.cfg.hidden_max_tokens)))
        log.info("run %s: shared memory store %.1f MB, slots %.1f MB on %s (%d experts of %d)", self.cfg.run_id,
                 store.nbytes / 1e6, slots_nbytes / 1e6, self.cfg.device, lay.n_slots, lay.n_experts)

    def _spawn(self, role: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", MODULES[role], "--run-dir", self.cfg.run_dir]
        child = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL)
        self.children[role] = child
        self._pidfds[os.pidfd_open(child.pid)] = role
        log.debug("started %s as pid %d", role, child.pid)
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            out = self.profile_dir / f"{role}.speedscope.json"
            self.profilers[role] = subprocess.Popen(
                ["py-spy", "record", "--pid", str(child.pid), "--format", "speedscope", "--output", str(out),
                 "--rate", "200"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)

    def _wait_ready(self, timeout_s: float) -> None:
        waiting = set(ROLES)
        deadline = time.monotonic() + timeout_s
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerDead(f"no ready report within {timeout_s:.0f} s from: {', '.join(sorted(waiting))}")
            self.wait(remaining)
            assert self.recv_from_workers is not None
            while self.recv_from_workers.poll(0):
                try:
                    msg = decode(self.recv_from_workers.recv())
                except ProtocolError as exc:
                    log.error("dropped a frame on the supervisor socket: %s", exc)
                    continue
                if isinstance(msg, WorkerStarted):
                    waiting.discard(msg.role)
                    log.debug("%s ready (pid %d)", msg.role, msg.pid)

    # ------------------------------------------------------------ watch
    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop waiting politely
            self.stop_signal = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        signal.set_wakeup_fd(self._wakeup_w)

    def wait(self, timeout_s: float, extra: zmq.Socket | None = None) -> None:
        """Block until a child dies, a signal or a message arrives, or ``timeout_s``; raise if a child died or a
        stop signal came."""
        poller = zmq.Poller()
        for fd in self._pidfds:
            poller.register(fd, zmq.POLLIN)
        poller.register(self._wakeup_r, zmq.POLLIN)
        if self.recv_from_workers is not None:
            poller.register(self.recv_from_workers, zmq.POLLIN)
        if extra is not None:
            poller.register(extra, zmq.POLLIN)
        poller.poll(int(max(timeout_s, 0) * 1000))
        self.check()

    def check(self) -> None:
        """Raise ``WorkerDead`` if any child has exited, ``KeyboardInterrupt`` if a stop signal arrived."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wakeup_r, 512)  # drain the signal wake-up bytes
        for role, child in self.children.items():
            code = child.poll()
            if code is not None:
                raise WorkerDead(f"{role} (pid {child.pid}) exited with code {code}")
        if self.stop_signal is not None:
            raise KeyboardInterrupt(f"signal {self.stop_signal}")

    # ------------------------------------------------------------ the one shutdown path
    def shutdown(self, reason: str) -> None:
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting down: %s", reason)
        hurry = False

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal hurry
            hurry = True  # another Ctrl-C/SIGTERM: kill now, but still unlink everything

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for role, child in self.children.items():
            while child.poll() is None and not hurry and time.monotonic() < deadline:
                time.sleep(0.02)
            if child.poll() is None:
                log.warning("%s (pid %d) still running after SIGTERM: killing it", role, child.pid)
                child.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
        for role, profiler in self.profilers.items():
            try:
                profiler.wait(timeout=1 if hurry else 30)  # py-spy writes its profile once the target has exited
            except subprocess.TimeoutExpired:
                log.warning("py-spy for %s did not finish writing; killing it", role)
                profiler.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    profiler.wait(timeout=5)
        for fd in self._pidfds:
            os.close(fd)
        self._pidfds.clear()
        if self.recv_from_workers is not None:
            self.recv_from_workers.close(linger=0)
        self._ctx.term()
        for segment in self.segments:
            segment.close()
            segment.unlink()
        leftovers = unlink_leftovers(self.cfg.run_id)
        if leftovers:
            log.warning("removed leftover segments %s", leftovers)
        shutil.rmtree(self.cfg.run_dir, ignore_errors=True)
        signal.set_wakeup_fd(-1)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
