"""What the live routing prediction costs per gate (``workers/routing_live.py``), on one thread as in the predictor
worker, for the embedded default model's shape and two real ones (the weights are untrained: the cost does not
depend on them).

    python bench/routing_live_cost.py [--gates 600] [--hidden 256]

Per shape: microseconds per decode gate (the lookahead's prediction and the outlook: two ``predict_at`` distances),
per token (one gate per MoE layer), and that per token against the GPU profile of ``bench/replay.py`` (0.5 ms of
compute per MoE layer, so a token takes at least ``L x 0.5`` ms).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from protocol.ids import RequestId
from protocol.messages import GateRouted, Message
from shm.layout import ExpertLayout
from training.routing_predictor import PredictorShape, RoutingPredictor, _Features, _Net
from workers.routing_live import LiveRoutingPredictor

SHAPES = {"default (6 x 32, top-4)": (6, 32, 4), "qwen-moe (24 x 60, top-4)": (24, 60, 4),
          "deepseek-v2-lite (26 x 64, top-6)": (26, 64, 6)}
COMPUTE_MS_PER_LAYER = 0.5


def cost_us(n_layers: int, per_layer: int, top_k: int, hidden: int, gates: int) -> float:
    """Mean microseconds per decode gate."""
    shape = PredictorShape(n_layers, per_layer, top_k, hidden)
    features = _Features(shape)
    predictor = RoutingPredictor(shape, _Net(shape, features.n_rows, features.padding))
    layout = ExpertLayout(moe_layers=tuple(range(n_layers)), experts_per_layer=per_layer, top_k=top_k, hidden_size=1,
                          intermediate_size=1, storage_dtype="bfloat16", compute_dtype="bfloat16", n_chunks=1,
                          n_slots=top_k)
    sent: list[Message] = []
    live = LiveRoutingPredictor(layout, predictor, 2, sent.append)
    rng = np.random.default_rng(0)

    def report(step: int, layer: int) -> GateRouted:
        return GateRouted(request_id=RequestId(1), step=step, layer=layer, n_tokens=1, token_ids=[int(step)],
                          experts=[rng.choice(per_layer, top_k, replace=False).tolist()])

    n_tokens = -(-gates // n_layers) + 3
    for step in range(3):  # history first
        for layer in range(n_layers):
            live.on_gate_routed(report(step, layer))
    live.calls = live.total_ns = 0
    for step in range(3, n_tokens):
        for layer in range(n_layers):
            live.on_gate_routed(report(step, layer))
    return live.total_ns / live.calls / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gates", type=int, default=600)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'shape':36} {'us/gate':>8} {'ms/token':>9} {'GPU token ms':>13} {'share':>6}")
    for name, (n_layers, per_layer, top_k) in SHAPES.items():
        us = cost_us(n_layers, per_layer, top_k, args.hidden, args.gates)
        token_ms = us * n_layers / 1e3
        floor_ms = n_layers * COMPUTE_MS_PER_LAYER
        print(f"{name:36} {us:8.0f} {token_ms:9.2f} {floor_ms:13.1f} {token_ms / floor_ms:6.1%}")


if __name__ == "__main__":
    main()
