"""What the live routing prediction costs per gate (``workers/routing_live.py``), on one thread as in the predictor
worker, for the embedded default model's shape and two real ones (the weights are untrained: the cost does not
depend on them).

    python bench/routing_live_cost.py [--gates 600] [--hidden 256] [--rows 1,4,16]

Per shape and batch: microseconds per decode gate (the lookahead's prediction and the outlook: two distances per
row), per step (one gate per MoE layer), and that per step against the GPU profile of ``bench/replay.py`` (0.5 ms of
compute per MoE layer, so a step takes at least ``L x 0.5`` ms). One row: ``generate()``'s reports (``GateRouted``);
several: the step loop's (``BatchRouted``, every row predicted in one call).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from protocol.ids import RequestId
from protocol.messages import BatchRouted, GateRouted, Message
from shm.layout import ExpertLayout
from training.routing_predictor import PredictorShape, RoutingPredictor, _Features, _Net
from workers.routing_live import LiveRoutingPredictor

SHAPES = {"default (6 x 32, top-4)": (6, 32, 4), "qwen-moe (24 x 60, top-4)": (24, 60, 4),
          "deepseek-v2-lite (26 x 64, top-6)": (26, 64, 6)}
COMPUTE_MS_PER_LAYER = 0.5


def cost_us(n_layers: int, per_layer: int, top_k: int, hidden: int, gates: int, rows: int) -> float:
    """Mean microseconds per decode gate of a pass of ``rows`` requests."""
    shape = PredictorShape(n_layers, per_layer, top_k, hidden)
    features = _Features(shape)
    predictor = RoutingPredictor(shape, _Net(shape, features.n_rows, features.padding))
    layout = ExpertLayout(moe_layers=tuple(range(n_layers)), experts_per_layer=per_layer, top_k=top_k, hidden_size=1,
                          intermediate_size=1, storage_dtype="bfloat16", compute_dtype="bfloat16", n_chunks=1,
                          n_slots=top_k)
    sent: list[Message] = []
    live = LiveRoutingPredictor(layout, predictor, 2, sent.append)
    rng = np.random.default_rng(0)

    def chosen() -> list[int]:
        return rng.choice(per_layer, top_k, replace=False).tolist()

    def report(step: int, layer: int) -> None:
        if rows == 1:
            live.on_gate_routed(GateRouted(request_id=RequestId(1), step=step, layer=layer, n_tokens=1,
                                           token_ids=[int(step)], experts=[chosen()]))
            return
        live.on_batch_routed(BatchRouted(
            request_id=RequestId(1), step=step, layer=layer, requests=[RequestId(1 + r) for r in range(rows)],
            positions=[step] * rows, n_tokens=[1] * rows, token_ids=[[step + r] for r in range(rows)],
            experts=[[chosen()] for _ in range(rows)]))

    n_tokens = -(-gates // n_layers) + 3
    for step in range(3):  # history first
        for layer in range(n_layers):
            report(step, layer)
    live.calls = live.total_ns = 0
    for step in range(3, n_tokens):
        for layer in range(n_layers):
            report(step, layer)
    return live.total_ns / live.calls / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gates", type=int, default=600)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rows", default="1", help="comma-separated batch sizes (requests per pass)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'shape':36} {'rows':>4} {'us/gate':>8} {'ms/step':>8} {'GPU step ms':>12} {'share':>6}")
    for name, (n_layers, per_layer, top_k) in SHAPES.items():
        for rows in (int(r) for r in args.rows.split(",")):
            us = cost_us(n_layers, per_layer, top_k, args.hidden, args.gates, rows)
            step_ms = us * n_layers / 1e3
            floor_ms = n_layers * COMPUTE_MS_PER_LAYER
            print(f"{name:36} {rows:4d} {us:8.0f} {step_ms:8.2f} {floor_ms:12.1f} {step_ms / floor_ms:6.1%}")


if __name__ == "__main__":
    main()
