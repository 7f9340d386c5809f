"""Experts computed on the host (``--host-compute``): the loader's side, which computes them from the host store on
its own thread, and the inference worker's side, which takes their outputs from the host exchange.

The computation is the experts backend's own (``OffloadedExperts._compute``) up to the routing weights: the rows
routed to the expert are selected in the same order (``workers.routes``), and gate_up, the activation, up and down
run in the compute dtype on weights converted from the store as the copy engine converts them into a slot. The
output rows are written unweighted; the inference worker multiplies them by the routing weights itself, with the
same operation as ``_compute``, so on the CPU the result is bit for bit the slot path's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.nn import functional as F

from protocol.ids import ExpertId
from protocol.messages import ComputeExpert, ExpertComputed, Message
from shm import quantized
from shm.expert_store import HostExpertStore
from shm.host_exchange import HostExchange
from shm.layout import ExpertLayout, torch_dtype
from workers.routes import Routes

log = logging.getLogger(__name__)

ActFn = Callable[[torch.Tensor], torch.Tensor]


def expert_rows(hidden: torch.Tensor, token_idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                act_fn: ActFn) -> torch.Tensor:
    """The unweighted output ``[n, H]`` of one expert for the rows ``token_idx`` of ``hidden [T, H]``."""
    current_state = hidden[token_idx]  # [n, H]
    gate, up = F.linear(current_state, gate_up).chunk(2, dim=-1)  # [n, I] each
    current = act_fn(gate) * up
    return F.linear(current, down)  # [n, H]


class HostExperts:
    """The loader's host computations: one at a time on their own thread (torch releases the GIL in its kernels,
    so the loader's copies go on), in the order the coordinator asked for them."""

    def __init__(self, layout: ExpertLayout, store: HostExpertStore, exchange: HostExchange, act_fn: ActFn,
                 report: Callable[[Message], None], clock_ns: Callable[[], int] = time.perf_counter_ns) -> None:
        self.layout = layout
        self.store = store
        self.exchange = exchange
        self.act_fn = act_fn
        self.report = report
        """Sends ``ExpertComputed``; called only from the computing thread."""
        self.clock_ns = clock_ns
        self.dtype = torch_dtype(layout.compute_dtype)
        self.dropped = 0
        """Jobs dropped because their input record had moved on (another request or step)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-experts")

    def submit(self, msg: ComputeExpert) -> None:
        self._executor.submit(self._run_logged, msg)

    def _run_logged(self, msg: ComputeExpert) -> None:
        try:
            self.run(msg)
        except Exception:  # the worker then waits for its slot (or times out): never silently
            log.exception("host computation of expert %d failed", msg.expert)

    def run(self, msg: ComputeExpert) -> bool:
        """Compute one expert now; False if the job was stale (dropped)."""
        started_ns = self.clock_ns()
        record = self.exchange.read_input(msg.layer, msg.request_id, msg.step)
        if record is None:
            self.dropped += 1
            log.debug("dropped host job for expert %d: request %d step %d has moved on", msg.expert, msg.request_id,
                      msg.step)
            return False
        rows32, top_k_index = record
        local = self.layout.split(msg.expert)[1]
        _, token_idx = torch.where((top_k_index == local).t())  # [k, T]: the rows in the order ``Routes`` gives
        out = expert_rows(rows32.to(self.dtype), token_idx, *self.weights(msg.expert), self.act_fn)
        self.exchange.write_output(msg.layer, msg.index, msg.request_id, msg.step, msg.expert, out)
        self.report(ExpertComputed(request_id=msg.request_id, expert=msg.expert, n_tokens=int(token_idx.numel()),
                                   duration_ns=self.clock_ns() - started_ns))
        return True

    def weights(self, expert: ExpertId) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up ``[2I, H]``, down ``[H, I]``) in the compute dtype, converted as a copy into a slot converts."""
        lay = self.layout
        if lay.quantized:  # the store holds the quantized row: dequantize it as a slot does
            row = self.store.expert(expert)
            return (quantized.dequantize_matrix(row, lay, "gate_up", self.dtype),
                    quantized.dequantize_matrix(row, lay, "down", self.dtype))
        flat = self.store.expert(expert).to(self.dtype)  # [3*I*H]; no copy when the dtypes agree
        split = 2 * lay.intermediate_size * lay.hidden_size
        return (flat[:split].view(2 * lay.intermediate_size, lay.hidden_size),
                flat[split:].view(lay.hidden_size, lay.intermediate_size))

    def close(self) -> None:
        """Finish the job in progress, drop the queued ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)


class HostOutputs:
    """The inference worker's side: publishes a small step's layer input before the gate is reported, and takes an
    expert's output when the host has written it. Also times the slot path's expert computations (the cost
    model's device time), reported with the next gate."""

    def __init__(self, exchange: HostExchange, clock_ns: Callable[[], int] = time.perf_counter_ns) -> None:
        self.exchange = exchange
        self.clock_ns = clock_ns
        self.published = False
        """Whether the current gate's input was published."""
        self.n_tokens = 0
        """Tokens of the current gate's step."""
        self.device_ns = 0
        self.device_experts = 0

    def publish(self, layer: int, request_id: int, step: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        """Before the gate report. Prefill (step 0) never goes to the host."""
        self.n_tokens = int(hidden.shape[0])
        self.published = step > 0 and self.exchange.write_input(layer, request_id, step, hidden, top_k_index)

    def take(self, layer: int, index: int, request_id: int, step: int, expert: ExpertId, local: int,
             routes: Routes, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token_idx, weighted output) of ``expert`` (local index ``local``, its rows in the backend's ``routes``)
        if the host has written it for this gate, else None."""
        if not self.published:
            return None
        rows = self.exchange.read_output(layer, index, request_id, step, expert)
        if rows is None:
            return None
        _, token_idx = routes.rows(local)
        return token_idx, routes.weighted(local, rows.to(device=routes.weights.device, dtype=dtype))

    def timed(self, started_ns: int) -> None:
        """One expert computed from its slot since ``started_ns``."""
        self.device_ns += self.clock_ns() - started_ns
        self.device_experts += 1

    def take_device_time(self) -> tuple[int, int]:
        """(ns, experts) computed from the slots since the last call."""
        out = (self.device_ns, self.device_experts)
        self.device_ns = self.device_experts = 0
        return out

