"""Synthetic experts: a checkpoint whose routed experts are generated in memory instead of read from disk.

For benchmarks at real size without writing tens of GB: the checkpoint directory holds config.json and the
non-expert weights as usual, plus ``promoe-synthetic-experts.json`` in place of the expert tensors. Expert ``e``
(a flat id, ``moe_layer * E + local``) is a window of one seeded random pool, at an offset chosen by ``e``:
deterministic, cheap (one pool of a few MB is generated; filling is a copy per expert), never all zeros, and
identical wherever it is built with the same torch (the loader's host store, a benchmark's reference model).
Optionally the rows ``zero_down_rows`` of every expert's ``down`` matrix are zero: those hidden dims receive
nothing from any expert (used by the routing-replay benchmark model, which reserves them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from protocol.ids import ExpertId
from shm.expert_store import HostExpertStore
from shm.layout import DTYPE_NBYTES, ExpertLayout, torch_dtype

log = logging.getLogger(__name__)

SYNTHETIC_EXPERTS_FILE = "promoe-synthetic-experts.json"
OFFSET_SPAN = 1 << 20
"""Window offsets are ``(e * OFFSET_STRIDE) % OFFSET_SPAN``: distinct for up to 2**20 experts."""
OFFSET_STRIDE = 1_000_003
"""Odd, so coprime with ``OFFSET_SPAN``."""
FILL_THREADS = 8
"""Copies run in parallel (torch releases the GIL): filling tens of GB is bound by page faults and memory."""


@dataclass(frozen=True)
class SyntheticExperts:
    """How the experts of a synthetic checkpoint are generated."""

    seed: int
    """Seed of the pool (torch's CPU generator)."""
    std: float
    """Standard deviation of the pool's normal values."""
    dtype: str
    """Storage dtype of the experts (a name of ``shm.layout.DTYPE_NBYTES``)."""
    zero_down_rows: tuple[int, int] = (0, 0)
    """``[start, stop)`` hidden dims whose ``down`` rows are zero in every expert (empty by default)."""

    def write(self, checkpoint: Path) -> None:
        (checkpoint / SYNTHETIC_EXPERTS_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, checkpoint: Path) -> SyntheticExperts | None:
        """The description in ``checkpoint``, or None for an ordinary checkpoint."""
        path = checkpoint / SYNTHETIC_EXPERTS_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        synthetic = cls(**{**data, "zero_down_rows": tuple(data.get("zero_down_rows", (0, 0)))})
        if synthetic.dtype not in DTYPE_NBYTES:
            raise ValueError(f"{path}: dtype {synthetic.dtype!r} is not one of {sorted(DTYPE_NBYTES)}")
        return synthetic

    def pool(self, expert_numel: int) -> torch.Tensor:
        """The seeded pool every expert is a window of: ``[expert_numel + OFFSET_SPAN]`` in ``dtype``, on the CPU."""
        gen = torch.Generator().manual_seed(self.seed)
        values = torch.randn(expert_numel + OFFSET_SPAN, generator=gen, dtype=torch.float32) * self.std
        return values.to(torch_dtype(self.dtype))

    @staticmethod
    def offset(expert: int) -> int:
        return (expert * OFFSET_STRIDE) % OFFSET_SPAN

    def expert(self, pool: torch.Tensor, layout: ExpertLayout, expert: int, out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Expert ``expert`` as one flat buffer ``[gate | up | down]`` (written into ``out`` if given)."""
        numel = layout.expert_numel
        start = self.offset(expert)
        window = pool[start : start + numel]
        if out is None:
            out = window.clone()
        else:
            out.copy_(window)
        lo, hi = self.zero_down_rows
        if hi > lo:
            down_at = 2 * layout.intermediate_size * layout.hidden_size
            out[down_at:].view(layout.hidden_size, layout.intermediate_size)[lo:hi] = 0
        return out


def fill_store(synthetic: SyntheticExperts, layout: ExpertLayout, store: HostExpertStore) -> float:
    """Generate every expert straight into the host store; returns the seconds it took."""
    started = time.monotonic()
    pool = synthetic.pool(layout.expert_numel)

    def fill(expert: int) -> None:
        if not layout.quantized:
            synthetic.expert(pool, layout, expert, out=store.expert(ExpertId(expert)))
            return
        flat = synthetic.expert(pool, layout, expert)  # [3*I*H]: gate | up | down, quantized into the store
        i, h = layout.intermediate_size, layout.hidden_size
        for n, which in enumerate(("gate", "up", "down")):
            shape = (h, i) if which == "down" else (i, h)
            store.write_matrix(ExpertId(expert), which, flat[n * i * h : (n + 1) * i * h].view(shape))

    threads = max(1, min(FILL_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool_of_threads:
        list(pool_of_threads.map(fill, range(layout.n_experts)))
    seconds = time.monotonic() - started
    log.info("host store generated (synthetic experts, seed %d): %d experts, %.2f GB in %.2f s on %d threads",
             synthetic.seed, layout.n_experts, layout.n_experts * layout.expert_nbytes / 1e9, seconds, threads)
    return seconds
