"""What one ``describe_cache`` snapshot costs the coordinator: building it and encoding its reply, with a full cache
(every slot resident, a cache's worth of evictions behind it), for three model geometries.

    python bench/cache_view_cost.py [--repeats 200]

Prints, per geometry, the median time to build and encode one snapshot and the reply's size on the wire.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.cache import CacheDirectory
from coordinator.cache_view import describe_cache
from coordinator.metrics import Totals
from coordinator.policies import make_policy
from protocol.codec import encode
from protocol.ids import ExpertId, RequestId
from protocol.messages import LoadExpert
from shm.layout import ExpertLayout
from shm.segment import Segment, segment_name
from shm.slot_table import SlotTable

GEOMETRIES = ((6, 32, 4, 48), (24, 60, 4, 360), (26, 160, 6, 1024))
"""(MoE layers, experts per layer, top-k, slots): the embedded default model; Qwen1.5-MoE-A2.7B-like;
DeepSeek-V2-Lite-like."""


def fill(cache: CacheDirectory, table: SlotTable, layers: int, per_layer: int, top_k: int, slots: int) -> None:
    """Gates choosing rotating experts, every load landing at once, until the cache turned over twice."""
    cache.begin_request(RequestId(1))
    for step in range(3 * slots // (layers * top_k) + 1):
        for layer in range(layers):
            chosen = [ExpertId(layer * per_layer + (step * top_k + i) % per_layer) for i in range(top_k)]
            cache.on_gate(step, layer, chosen, [])
            for command in cache.drain():
                if isinstance(command, LoadExpert):
                    table.publish_ready(command.slot, command.seq, 1)
                    cache.on_loaded(command.load_id, command.seq)
            cache.drain()


def measure(layers: int, per_layer: int, top_k: int, slots: int, repeats: int) -> str:
    layout = ExpertLayout(moe_layers=tuple(range(layers)), experts_per_layer=per_layer, top_k=top_k, hidden_size=8,
                          intermediate_size=4, storage_dtype="bfloat16", compute_dtype="float32", n_chunks=1,
                          n_slots=slots)
    segment = Segment.create(segment_name(f"bench{uuid.uuid4().hex[:8]}", "table"),
                             SlotTable.nbytes_for(slots, layout.n_experts))
    try:
        table = SlotTable(segment, slots, layout.n_experts, 1, init=True)
        try:
            cache = CacheDirectory(table, layout, make_policy("promoe", layout))
            fill(cache, table, layers, per_layer, top_k, slots)
            times_s, frame = [], b""
            for _ in range(repeats):
                started = time.perf_counter()
                frame = encode(describe_cache(cache, Totals(), 1.0, RequestId(1), 1.0, 2.0))
                times_s.append(time.perf_counter() - started)
            return (f"{layers} MoE layers x {per_layer} experts, {slots} slots: build + encode "
                    f"{statistics.median(times_s) * 1e6:.0f} us (median of {repeats}), reply {len(frame)} bytes")
        finally:
            table.close()
    finally:
        segment.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    for geometry in GEOMETRIES:
        print(measure(*geometry, repeats=args.repeats))


if __name__ == "__main__":
    main()
