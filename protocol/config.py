"""The runtime's configuration: decided once by the supervisor, written to the run directory, read by every process."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shm.layout import ExpertLayout
from shm.segment import segment_name

ROLES = ("coordinator", "inference", "predictor", "loader")
GATEWAY = "gateway"
"""The HTTP gateway's role: started after ``ROLES`` when the runtime serves HTTP (``http``)."""
POLICIES = ("ondemand", "lru", "lfu", "promoe")
CONFIG_FILE = "runtime.json"


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything a process of one runtime needs to start."""

    run_id: str
    """Unique per runtime; names its shared-memory segments."""
    run_dir: str
    """Directory of the ``ipc://`` endpoints and of this file."""
    checkpoint: str
    """Checkpoint directory (config.json + safetensors)."""
    layout: ExpertLayout
    """Expert store and cache geometry."""
    policy: str
    """Cache policy, one of ``POLICIES``: ondemand | lru | lfu | promoe (``coordinator/policies/``)."""
    device: str
    """cpu | cuda."""
    bind: str
    """ZeroMQ address of the client ROUTER socket."""
    link_gbps: float | None
    """Emulated host-to-device bandwidth on the CPU path (None: copy as fast as memcpy goes)."""
    lookahead: int
    """Layers ahead the predictor targets."""
    predictor_path: str | None
    """Trained predictor file, if any."""
    load_timeout_s: float
    """Longest a request may wait for experts in all (every layer's and token's waits added up) before it fails."""
    supervisor_pid: int
    """The launcher; workers exit when it goes."""
    hidden_max_tokens: int = 64
    """Rows of each MoE layer's input shared with the predictor (the last ones of a long prefill)."""
    early_preemption: bool = True
    """promoe: preempt and reorder speculative loads when a gate reports (off only for ablations)."""
    heartbeat_timeout_s: float = 90.0
    """A worker that answers no ping for this long is killed by the supervisor (and so restarted)."""
    reordered_inference: bool = True
    """Compute experts as they become ready; off: strictly in ascending expert order (ablations)."""
    max_queue: int = 64
    """Requests waiting (not counting the running ones) before new ones get an immediate ``busy`` error."""
    max_batch: int = 1
    """Requests decoded together, one token each per step (``workers/step_loop.py``); 1: one at a time with
    ``generate()``."""
    prefill_chunk: int = 128
    """With ``max_batch`` > 1: prompt tokens prefilled per step, so that a long prompt stalls the batch one chunk at
    a time."""
    request_timeout_s: float | None = None
    """Server-wide deadline of a request from its arrival, queued or running (None: none); caps ``deadline_s``."""
    vocab_size: int | None = None
    """Token ids a request may carry (checked on admission; None: left to the inference worker)."""
    record_trace: str | None = None
    """Append every request's routing to this trace file (``workers/trace_recorder.py``; None: no recording)."""
    record_hidden: bool = False
    """With ``record_trace``: also each MoE layer's input (hidden states), for judging hidden-state predictors."""
    routing_predictor_path: str | None = None
    """Routing predictor file (``.npz`` of ``training.routing_predictor``): the predictor worker predicts from the
    gates' routing and the token ids (``workers/routing_live.py``) instead of hidden states (None: not used)."""
    curve_keys_dir: str | None = None
    """ZeroMQ CURVE on the client socket: server keypair and ``authorized_clients/`` here (None: no encryption)."""
    inference_core: int | None = None
    """The CPU stand-in's model of a GPU (``--stand-in-cores``): the inference worker alone on this core with one
    torch thread, every other process of the runtime on the remaining cores, so that loading, predicting and
    coordinating take no time from the model's compute (on a GPU they run beside it). None: no placement."""

    compute_threads: int | None = None
    """torch threads of the inference worker on the CPU path (None: torch's own default, which follows
    ``OMP_NUM_THREADS`` and the physical cores, but at most one fewer than the cores the runtime may use and at least
    one, so that the loader, the predictor and the coordinator keep a core: on two cores, two threads spent about
    40% of a batched decode step spinning in OpenMP barriers). With ``inference_core``: one."""

    http: str | None = None
    """``HOST:PORT`` of the HTTP gateway (``workers/gateway.py``; None: no gateway, ZeroMQ only)."""
    http_api_key: str | None = None
    """Bearer token every HTTP request must carry (None: none asked for). The run directory is private (0700)."""
    served_model_name: str = "promoe"
    """The model's id on the HTTP API (``/v1/models``, the ``model`` field of responses)."""
    http_max_inflight: int | None = None
    """Generate requests the gateway holds at once (each on a ZeroMQ connection of its own, from admission to its
    final reply); past it, a new one is answered 429 ``busy`` at once. None: ``max_queue + 1``, what the coordinator
    itself can hold (the running request and the queue)."""

    host_compute: str = "never"
    """Compute missing experts on the host (``coordinator/host_compute.py``): ``auto`` where the cost model expects
    the output sooner than a copy's, ``always`` every miss of a small step, ``never``. ``launch.py`` defaults to
    ``auto``; a config built in process (tests, tools that make their own segments) to ``never``."""
    host_max_tokens: int = 4
    """Largest step (tokens) whose experts may be computed on the host; larger steps (prefill) always load."""

    @property
    def http_inflight_limit(self) -> int:
        """``http_max_inflight``, or its default."""
        return self.http_max_inflight if self.http_max_inflight is not None else self.max_queue + 1

    @property
    def roles(self) -> tuple[str, ...]:
        """The processes the supervisor starts, in order: the gateway last, once the coordinator serves."""
        return (*ROLES, GATEWAY) if self.http else ROLES

    def place(self, role: str) -> None:
        """Put the calling process of ``role`` on its cores (``inference_core``) and give the inference worker its
        torch threads on the CPU path (``compute_threads``)."""
        if self.inference_core is not None:
            cores = {self.inference_core} if role == "inference" else os.sched_getaffinity(0) - {self.inference_core}
            os.sched_setaffinity(0, cores)
        if role == "inference" and self.device == "cpu":
            import torch

            torch.set_num_threads(self.inference_threads)

    @property
    def inference_threads(self) -> int:
        """The inference worker's torch threads on the CPU path (``compute_threads`` or its default)."""
        if self.inference_core is not None:
            return 1
        if self.compute_threads is not None:
            return self.compute_threads
        import torch

        return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) - 1))

    @property
    def prefetch(self) -> bool:
        """Whether predictions drive speculative loads (the ``promoe`` policy)."""
        return self.policy == "promoe"

    def endpoint(self, role: str) -> str:
        """The ``ipc://`` inbox of ``role`` (or of the supervisor)."""
        return f"ipc://{Path(self.run_dir) / role}.sock"

    def segment(self, what: str) -> str:
        return segment_name(self.run_id, what)

    def write(self) -> Path:
        path = Path(self.run_dir) / CONFIG_FILE
        data = asdict(self)
        data["layout"] = self.layout.to_json()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.rename(path)
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RuntimeConfig:
        data = json.loads((Path(run_dir) / CONFIG_FILE).read_text())
        data["layout"] = ExpertLayout.from_json(data["layout"])
        return cls(**data)


SEGMENTS = ("store", "slots", "table", "hidden", "host")
"""The segments of a runtime on the CPU path, all created and unlinked by the supervisor."""
