"""The supervisor: the ``launch.py`` process. It owns every shared-memory segment, starts the four processes (five with
``--http``: the gateway, ``workers/gateway.py``), waits for each to report ready, watches them, restarts the workers
that die, and stops them all through one shutdown path.

Child deaths are seen through pidfds (no polling of ``waitpid``); SIGINT/SIGTERM wake the same poller through the
signal wake-up fd.

- A worker (inference, predictor, loader) that dies after it reported ready is restarted at once: the coordinator
  is told (``WorkerDied``: it fails the request in progress if the inference worker died), the new process attaches
  to the same segments, and when it reports ready the coordinator is told again (``WorkerRestarted``: it re-issues
  the loads a dead loader had queued, or starts the next request).
- A process that dies before reporting ready (a crash loop, a bad checkpoint), a restart that does not report ready
  within the start-up deadline, or the death of the coordinator (which owns the cache directory and the clients'
  requests) stops the runtime with ``WorkerDead``.
- ``shutdown`` is the only way out: SIGTERM every child, wait with a deadline, SIGKILL what is left, then unlink
  every segment, remove torch's shared-memory files of every process it ever started (the CUDA IPC reference
  counters that a killed inference worker leaves in ``/dev/shm`` as ``torch_<pid>_*``) and the run directory.
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
from protocol.config import GATEWAY, RuntimeConfig
from protocol.dispatch import Dispatcher
from protocol.messages import (
    ALIVE_INTERVAL_S,
    Drained,
    DrainRequested,
    WorkerAlive,
    WorkerDied,
    WorkerRestarted,
    WorkerSilent,
    WorkerStarted,
)
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.hidden_exchange import HiddenExchange
from shm.host_exchange import HostExchange
from shm.ordering import require_ordered_stores
from shm.segment import Segment, unlink_leftovers, unlink_torch_files
from shm.slot_table import SlotTable
from workers.bootstrap import WorkerDead, push_socket, send

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    "coordinator": "coordinator.server",
    "inference": "workers.inference",
    "predictor": "workers.predictor",
    "loader": "workers.loader",
    "gateway": "workers.gateway",
}
RESTARTABLE = ("inference", "predictor", "loader", "gateway")
RESTARTABLE_ON_CUDA = ("predictor", "gateway")
"""On the CUDA path the loader maps the inference worker's slots by CUDA IPC once, at start-up: a new inference
worker would allocate new slots and a new loader would need them exported again, which is not wired (and has never
run on a GPU), so there the death of either stops the runtime."""
HURRIED_STOP_S = 1.0
"""After a second signal, how long processes get to exit on SIGTERM before SIGKILL (the coordinator answers the
requests it holds with ``shutting_down`` on its way out)."""


class Supervisor:
    def __init__(self, cfg: RuntimeConfig, profile_dir: Path | None = None, stop_timeout_s: float = 10.0,
                 machine: str | None = None) -> None:
        self.cfg = cfg
        self.machine = machine
        """The host CPU as ``platform.machine()`` names it (None: this host's; tests inject another)."""
        self.profile_dir = profile_dir
        self.stop_timeout_s = stop_timeout_s
        self.children: dict[str, subprocess.Popen] = {}
        self.child_pids: list[int] = []
        """Every process started, restarts included: whose torch files in /dev/shm are removed once it is gone."""
        self.profilers: list[tuple[str, subprocess.Popen]] = []
        self.segments: list[Segment] = []
        self._pidfds: dict[str, int] = {}
        self._starting: dict[str, float] = {}
        """Role -> deadline (monotonic) for its ``WorkerStarted``."""
        self.ready_timeout_s = 180.0
        self.restartable = RESTARTABLE_ON_CUDA if cfg.device == "cuda" else RESTARTABLE
        self.restarts: dict[str, int] = dict.fromkeys(RESTARTABLE, 0)
        """Role -> restarts since start (the gateway's too: it is a client of the coordinator, nothing more)."""
        self.send_to_coordinator: zmq.Socket | None = None
        self.signals: list[int] = []
        """SIGINT/SIGTERM received, in order: the first drains (when serving), a second stops at once."""
        self._drained = False
        self._stopped = False
        self._ctx = zmq.Context()
        self.recv_from_workers: zmq.Socket | None = None
        self.dispatch = Dispatcher("supervisor", {Drained: self._on_drained, WorkerSilent: self._on_worker_silent,
                                                  WorkerStarted: self._on_worker_started,
                                                  WorkerAlive: self._on_worker_alive})
        self._alive_at: dict[str, float] = {}
        """Role -> when (monotonic) its last ``WorkerAlive`` came (the gateway's; from its ready report on)."""
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)

    # ------------------------------------------------------------ start
    def start(self, ready_timeout_s: float) -> None:
        """Create the segments, start the four processes, and wait until each reports ready. Refuses
        (``UnsupportedArchitecture``), before creating anything, on a CPU without x86's memory ordering."""
        require_ordered_stores(self.machine)
        self._install_signal_handlers()
        self.ready_timeout_s = ready_timeout_s
        try:
            self._create_segments()
            self.cfg.write()
            self.recv_from_workers = self._ctx.socket(zmq.PULL)
            self.recv_from_workers.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
            self.recv_from_workers.setsockopt(zmq.LINGER, 0)
            self.recv_from_workers.bind(self.cfg.endpoint("supervisor"))
            self.send_to_coordinator = push_socket(self._ctx, self.cfg.endpoint("coordinator"))
            for role in self.cfg.roles:
                self._spawn(role)
            while self._starting:
                self.wait(min(self._starting.values()) - time.monotonic())
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
        self.segments.append(Segment.create(self.cfg.segment("host"), HostExchange.nbytes_for(
            len(lay.moe_layers), lay.experts_per_layer, lay.top_k, lay.hidden_size, self.cfg.host_max_tokens)))
        log.info("run %s: shared memory store %.1f MB, slots %.1f MB on %s (%d experts of %d)", self.cfg.run_id,
                 store.nbytes / 1e6, slots_nbytes / 1e6, self.cfg.device, lay.n_slots, lay.n_experts)

    def _spawn(self, role: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", MODULES[role], "--run-dir", self.cfg.run_dir]
        child = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL)
        self.children[role] = child
        self.child_pids.append(child.pid)
        self._pidfds[role] = os.pidfd_open(child.pid)
        self._starting[role] = time.monotonic() + self.ready_timeout_s
        log.debug("started %s as pid %d", role, child.pid)
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            restarts = self.restarts.get(role, 0)
            out = self.profile_dir / (f"{role}.speedscope.json" if not restarts else
                                      f"{role}.restart{restarts}.speedscope.json")
            self.profilers.append((role, subprocess.Popen(
                ["py-spy", "record", "--pid", str(child.pid), "--format", "speedscope", "--output", str(out),
                 "--rate", "200"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)))

    def _restart(self, role: str, child: subprocess.Popen, code: int) -> None:
        log.error("%s (pid %d) exited with code %d: restarting it", role, child.pid, code)
        os.close(self._pidfds.pop(role))
        self._remove_torch_files([child.pid])
        assert self.send_to_coordinator is not None
        send(self.send_to_coordinator, WorkerDied(role=role, pid=child.pid, exit_code=code))
        self.restarts[role] += 1
        self._spawn(role)

    def _drain_inbox(self) -> None:
        if self.recv_from_workers is None:
            return
        while self.recv_from_workers.poll(0):
            try:
                msg = decode(self.recv_from_workers.recv())
            except ProtocolError as exc:
                log.error("dropped a frame on the supervisor socket: %s", exc)
                continue
            self.dispatch(msg)

    def _on_drained(self, msg: Drained) -> None:
        self._drained = True

    def _on_worker_silent(self, msg: WorkerSilent) -> None:
        child = self.children.get(msg.role)
        if msg.role in self.restartable and child is not None and msg.role not in self._starting:
            log.error("%s (pid %d) silent for %.0f s: killing it", msg.role, child.pid, msg.silent_s)
            child.kill()  # its pidfd wakes the next wait(): the usual death-and-restart path

    def _on_worker_alive(self, msg: WorkerAlive) -> None:
        if msg.role in self._alive_at and self.children[msg.role].pid == msg.pid:
            self._alive_at[msg.role] = time.monotonic()

    @property
    def idle_wait_s(self) -> float:
        """How long the serving loop may block in ``wait``: short while a process is watched by its beacons."""
        return ALIVE_INTERVAL_S if self._alive_at else 3600.0

    def _kill_silent(self) -> None:
        """Kill a process whose beacons stopped for ``heartbeat_timeout_s`` (its death then restarts it)."""
        now = time.monotonic()
        for role, alive_at in self._alive_at.items():
            child = self.children[role]
            if role not in self._starting and now - alive_at > self.cfg.heartbeat_timeout_s and child.poll() is None:
                log.error("%s (pid %d) sent no beacon for %.0f s: killing it", role, child.pid, now - alive_at)
                child.kill()
                self._alive_at[role] = now  # once: the restart re-arms it

    def _on_worker_started(self, msg: WorkerStarted) -> None:
        if self._starting.pop(msg.role, None) is None:
            log.error("unexpected %s of %s, which is not starting", type(msg).__name__, msg.role)
            return
        if msg.role == GATEWAY:
            self._alive_at[msg.role] = time.monotonic()
        log.debug("%s ready (pid %d)", msg.role, msg.pid)
        if self.restarts.get(msg.role):
            log.info("%s restarted (pid %d, restart %d)", msg.role, msg.pid, self.restarts[msg.role])
            assert self.send_to_coordinator is not None
            send(self.send_to_coordinator, WorkerRestarted(role=msg.role, pid=msg.pid))

    # ------------------------------------------------------------ watch
    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.signals.append(signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        signal.set_wakeup_fd(self._wakeup_w)

    def wait(self, timeout_s: float, extra: zmq.Socket | None = None) -> None:
        """Block until a child dies, a signal or a message arrives, or ``timeout_s``; raise if a child died or a
        stop signal came."""
        poller = zmq.Poller()
        for fd in self._pidfds.values():
            poller.register(fd, zmq.POLLIN)
        poller.register(self._wakeup_r, zmq.POLLIN)
        if self.recv_from_workers is not None:
            poller.register(self.recv_from_workers, zmq.POLLIN)
        if extra is not None:
            poller.register(extra, zmq.POLLIN)
        poller.poll(int(max(timeout_s, 0) * 1000))
        self.check()

    def check(self) -> None:
        """Restart the workers that died after start-up; take ready reports; raise ``WorkerDead`` for a death that
        is not restarted or a start-up past its deadline, ``KeyboardInterrupt`` if a stop signal arrived."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wakeup_r, 512)  # drain the signal wake-up bytes
        for role, child in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            if role in self._starting or role not in self.restartable:
                during = " during start-up" if role in self._starting else ""
                raise WorkerDead(f"{role} (pid {child.pid}) exited with code {code}{during}")
            self._restart(role, child, code)
        self._drain_inbox()
        self._kill_silent()
        late = sorted(role for role, deadline in self._starting.items() if time.monotonic() > deadline)
        if late:
            raise WorkerDead(f"no ready report within {self.ready_timeout_s:.0f} s from: {', '.join(late)}")
        if self.signals:
            raise KeyboardInterrupt(f"signal {self.signals[0]}")

    def drain(self, timeout_s: float) -> None:
        """Ask the coordinator to finish the accepted requests and refuse new ones; return when it reports
        ``Drained``, when ``timeout_s`` (plus a grace second) has passed, on a second signal, or if a process died."""
        signals = len(self.signals)
        assert self.send_to_coordinator is not None
        send(self.send_to_coordinator, DrainRequested(timeout_s=timeout_s))
        log.info("draining: finishing accepted requests (at most %.0f s; signal again to stop at once)", timeout_s)
        deadline = time.monotonic() + timeout_s + 1.0
        while not self._drained and len(self.signals) == signals:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("the coordinator did not report drained within %.0f s", timeout_s)
                return
            try:
                self.wait(remaining)
            except WorkerDead as exc:
                log.error("%s while draining", exc)
                return
            except KeyboardInterrupt:
                pass  # the first signal is still recorded; the loop condition looks for a second one

    def _remove_torch_files(self, pids: list[int]) -> None:
        """torch's files in /dev/shm of these exited children: nothing else removes them after ``kill -9``."""
        removed = unlink_torch_files(pids)
        if removed:
            log.warning("removed torch shared-memory files left by exited workers: %s", removed)

    # ------------------------------------------------------------ the one shutdown path
    def shutdown(self, reason: str) -> None:
        if self._stopped:
            return
        self._stopped = True
        hurry = len(self.signals) > 1  # a second signal: do not wait politely
        log.info("shutting down%s: %s", " at once" if hurry else "", reason)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal hurry
            hurry = True  # another Ctrl-C/SIGTERM: kill now, but still unlink everything

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for role, child in self.children.items():
            while child.poll() is None and time.monotonic() - started < (HURRIED_STOP_S if hurry else
                                                                         self.stop_timeout_s):
                time.sleep(0.02)
            if child.poll() is None:
                log.warning("%s (pid %d) still running after SIGTERM: killing it", role, child.pid)
                child.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
        for role, profiler in self.profilers:
            try:
                profiler.wait(timeout=1 if hurry else 30)  # py-spy writes its profile once the target has exited
            except subprocess.TimeoutExpired:
                log.warning("py-spy for %s did not finish writing; killing it", role)
                profiler.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    profiler.wait(timeout=5)
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
        if self.recv_from_workers is not None:
            self.recv_from_workers.close(linger=0)
        if self.send_to_coordinator is not None:
            self.send_to_coordinator.close(linger=0)
        self._ctx.term()
        for segment in self.segments:
            segment.close()
            segment.unlink()
        leftovers = unlink_leftovers(self.cfg.run_id)
        if leftovers:
            log.warning("removed leftover segments %s", leftovers)
        self._remove_torch_files(self.child_pids)
        shutil.rmtree(self.cfg.run_dir, ignore_errors=True)
        signal.set_wakeup_fd(-1)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
