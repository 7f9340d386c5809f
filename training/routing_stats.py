"""How much a model's routing depends on the token, measured on a routing trace (DESIGN.md section 4).

Random weights at a small init send nearly every token to the same experts, which flatters every cache. These
figures say which regime a trace is in:

- ``consecutive_overlap``: share of a token's top-k that the next token's gate (same layer) chooses again;
- ``top_quarter_share``: share of all expert uses taken by the most used quarter of each layer's experts;
- ``gate_reuse_accuracy``: at distance ``d``, share of the true top-k that the target layer's own gate picks when fed
  the hidden state from ``d`` MoE layers earlier (same token; the first ``d`` layers are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.predictor_training import Trace, topk_accuracy


@dataclass(frozen=True)
class RoutingStats:
    """Routing figures of one trace (means over MoE layers)."""

    consecutive_overlap: float
    """Share of a token's experts chosen again by the next token, same layer."""
    top_quarter_share: float
    """Share of uses taken by the most used quarter of a layer's experts."""
    gate_reuse_accuracy: dict[int, float]
    """Distance -> skip-layer gate accuracy."""
    tokens: int
    """Tokens in the trace."""


def consecutive_overlap(chosen: torch.Tensor) -> float:
    """``chosen`` [L, W, S, k]: mean share of position t's experts that position t+1 chooses again."""
    now, nxt = chosen[:, :, :-1], chosen[:, :, 1:]  # [L, W, S-1, k]
    again = (now.unsqueeze(-1) == nxt.unsqueeze(-2)).any(-1)  # [L, W, S-1, k]
    return again.float().mean().item()


def top_quarter_share(chosen: torch.Tensor, experts_per_layer: int) -> float:
    """``chosen`` [L, W, S, k]: share of uses taken by each layer's most used quarter of experts, averaged."""
    shares = []
    quarter = max(1, experts_per_layer // 4)
    for layer in chosen:
        counts = torch.bincount(layer.reshape(-1), minlength=experts_per_layer).float()  # [E]
        shares.append((counts.sort(descending=True).values[:quarter].sum() / counts.sum()).item())
    return sum(shares) / len(shares)


def gate_reuse_accuracy(trace: Trace, routers: torch.Tensor, distance: int) -> float:
    """``routers`` [L, E, H]: the target layer's gate on the source layer's input, same token."""
    n_layers, k = trace.hidden.shape[0], trace.chosen.shape[-1]
    scores = []
    for target in range(distance, n_layers):
        x = trace.hidden[target - distance].reshape(-1, trace.hidden.shape[-1]).float()  # [N, H]
        y = trace.chosen[target].reshape(-1, k)  # [N, k]
        scores.append(topk_accuracy((x @ routers[target].float().T).topk(k, dim=-1).indices, y))
    return sum(scores) / len(scores)


def routing_stats(trace: Trace, routers: torch.Tensor, distances: tuple[int, ...] = (1, 2)) -> RoutingStats:
    experts_per_layer = routers.shape[1]
    return RoutingStats(
        consecutive_overlap=consecutive_overlap(trace.chosen),
        top_quarter_share=top_quarter_share(trace.chosen, experts_per_layer),
        gate_reuse_accuracy={d: gate_reuse_accuracy(trace, routers, d) for d in distances},
        tokens=trace.token_ids.numel(),
    )
