"""A routing predictor from what the runtime knows without hidden states: the token, the experts its gates chose at
the layers already run, and the experts of the tokens before it.

At MoE layer ``l`` of token ``t`` it predicts the experts of the layer ``d`` ahead, ``l + d``; past the last layer that
is the next token's layer ``l + d - L`` (whose token is not known yet, so the current token stands for it). Inputs,
all as rows of one embedding table summed into a hidden vector (a bag of features, no hand-made interactions):

- this token's experts at layers ``l``, ``l - 1``, ... ``l - 7`` (per layer: an expert means something different at
  each; eight layers rather than three raised precision at d = 2 from 0.621 to 0.633 on the DeepSeek trace);
- the token before the target's token: its experts at the target layer and its two neighbours (known by then), and
  the token two before at the target layer (what a cache of recent routing would know);
- the token's id, the previous token's id (hashed into ``TOKEN_BUCKETS``), the distance and the target layer.

A two-layer MLP and one output head per target layer give, per expert, the probability that the target gate chooses
it (sigmoid, trained with binary cross-entropy, so probabilities are calibrated for the policy's cost model).
Everything is deterministic for a seed. Weights save to ``.npz`` (no pickle).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

TOKEN_BUCKETS = 1 << 14
"""Token ids are hashed (modulo) into this many embedding rows: a trace's ids index its own vocabulary."""
CURRENT_LAYERS = 8
"""This token's layers fed in: ``l``, ``l - 1``, ... (``CURRENT_LAYERS`` of them)."""
MAX_DISTANCE = 8
"""Distances past this share one embedding row."""


@dataclass(frozen=True)
class PredictorShape:
    n_layers: int
    """MoE layers of the model."""
    experts_per_layer: int
    """Routed experts per MoE layer."""
    top_k: int
    """Experts each gate chooses."""
    hidden: int = 256
    """Width of the hidden layers."""


class _Features:
    """Row offsets of each feature group in the one embedding table."""

    def __init__(self, shape: PredictorShape) -> None:
        n_layer_experts = shape.n_layers * shape.experts_per_layer
        self.current = 0  # CURRENT_LAYERS x L x E
        self.previous = self.current + CURRENT_LAYERS * n_layer_experts  # 3 (j-1, j, j+1) x L x E
        self.before_previous = self.previous + 3 * n_layer_experts  # L x E
        self.token = self.before_previous + n_layer_experts  # TOKEN_BUCKETS
        self.previous_token = self.token + TOKEN_BUCKETS  # TOKEN_BUCKETS
        self.target = self.previous_token + TOKEN_BUCKETS  # MAX_DISTANCE x L
        self.padding = self.target + MAX_DISTANCE * shape.n_layers
        self.n_rows = self.padding + 1


class _Net(nn.Module):
    def __init__(self, shape: PredictorShape, n_rows: int, padding: int) -> None:
        super().__init__()
        h, n_experts = shape.hidden, shape.experts_per_layer
        self.padding = padding
        self.table = nn.Parameter(torch.randn(n_rows, h) * 0.02)
        self.bias = nn.Parameter(torch.zeros(h))
        self.mid = nn.Linear(h, h)
        self.head = nn.Parameter(torch.randn(shape.n_layers, h, n_experts) * h**-0.5)  # per target layer
        self.head_bias = nn.Parameter(torch.zeros(shape.n_layers, n_experts))
        self.register_buffer("temperature", torch.ones(()))  # logits are divided by it (calibration)
        self.temperature: torch.Tensor

    def forward(self, rows: torch.Tensor, target_layer: int) -> torch.Tensor:
        """``rows [B, S]`` feature rows (``padding`` for none), all aimed at one target layer -> logits ``[B, E]``."""
        return self.logits(F.embedding_bag(rows, self.table, mode="sum", padding_idx=self.padding), target_layer)

    def logits(self, bag: torch.Tensor, target_layer: int) -> torch.Tensor:
        """``bag [B, H]`` summed feature rows -> logits ``[B, E]`` of the target layer's experts."""
        x = F.relu(self.mid(F.relu(bag + self.bias)))  # [B, H]
        return x @ self.head[target_layer] + self.head_bias[target_layer]  # [B, E]

    def logits_each(self, bag: torch.Tensor, target_layers: torch.Tensor) -> torch.Tensor:
        """``bag [B, H]``, row ``i`` aimed at ``target_layers[i]`` -> logits ``[B, E]``: ``logits`` row by row, in
        one call (the live path predicts several distances per gate)."""
        x = F.relu(self.mid(F.relu(bag + self.bias)))  # [B, H]
        return torch.bmm(x.unsqueeze(1), self.head[target_layers]).squeeze(1) + self.head_bias[target_layers]


class _RowAdam:
    """Adam on the rows of the embedding table a batch touches only (a batch touches a few thousand of its tens of
    thousands of rows: a dense update would cost most of a step). The padding row stays zero."""

    def __init__(self, table: torch.Tensor, padding: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.table, self.padding, self.lr, self.betas, self.eps = table, padding, lr, betas, eps
        self.m = torch.zeros_like(table)
        self.v = torch.zeros_like(table)
        self.steps = 0

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """``rows [U]`` distinct rows, ``grad [U, H]`` their gradients."""
        self.steps += 1
        b1, b2 = self.betas
        keep = rows != self.padding
        rows, grad = rows[keep], grad[keep]
        m = self.m[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.v[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.m[rows], self.v[rows] = m, v
        step = self.lr * (1 - b2**self.steps) ** 0.5 / (1 - b1**self.steps)
        self.table[rows] -= step * m / (v.sqrt() + self.eps)


def _previous_token(starts: np.ndarray, steps: int) -> np.ndarray:
    """``[N]`` the index of the token ``steps`` before each token in its prompt (``starts [N]``: the first token of
    each one's prompt), -1 where there is none."""
    t = np.arange(len(starts)) - steps
    return np.where(t >= starts, t, -1)


def _rows(shape: PredictorShape, experts: np.ndarray, token_ids: np.ndarray, prompt_offsets: np.ndarray,
          distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature rows of every (token, layer) for a prediction ``distance`` ahead.

    Returns ``rows [N, L, S]`` int64, ``target_token [N, L]`` (the token whose gate is predicted, -1 past the prompt)
    and ``target_layer [N, L]``.
    """
    n, n_layers, _ = experts.shape
    e_per = shape.experts_per_layer
    f = _Features(shape)
    pad = f.padding
    layers = np.arange(n_layers)
    experts = experts.astype(np.int64)
    ahead = layers + distance  # [L]
    wrap = ahead // n_layers  # [L] 0: this token, 1: the next
    target_layer = np.broadcast_to(ahead % n_layers, (n, n_layers))  # [N, L]
    ends = np.repeat(prompt_offsets[1:], np.diff(prompt_offsets))  # [N] end of each token's prompt
    next_token = np.where(np.arange(n) + 1 < ends, np.arange(n) + 1, -1)  # [N] (-1: the prompt's last token)
    target_token = np.where(wrap[None, :] == 0, np.arange(n)[:, None], next_token[:, None])  # [N, L]
    groups: list[np.ndarray] = []
    t_index = np.arange(n)[:, None]  # [N, 1]

    def layer_rows(token: np.ndarray, layer: np.ndarray, known: np.ndarray, base: int) -> np.ndarray:
        """``[N, L, k]`` rows ``base + layer * E + expert`` of ``token [N, L]`` at ``layer [N, L]``."""
        ok = known & (token >= 0) & (layer >= 0) & (layer < n_layers)
        inside = np.minimum(np.maximum(layer, 0), n_layers - 1)  # (np.clip costs more per call on small arrays)
        chosen = experts[np.maximum(token, 0), inside]  # [N, L, k]
        return np.where(ok[..., None], base + inside[..., None] * e_per + chosen, pad)

    everywhere = np.ones((n, n_layers), dtype=bool)
    this_token = np.broadcast_to(t_index, (n, n_layers))
    for r in range(CURRENT_LAYERS):
        layer = np.broadcast_to(layers - r, (n, n_layers))
        groups.append(layer_rows(this_token, layer, everywhere, f.current + r * n_layers * e_per))
    # The token before the target's: this token's predecessor, or this token itself when the target is the next one.
    starts = np.repeat(prompt_offsets[:-1], np.diff(prompt_offsets))  # [N] start of each token's prompt
    before1, before2 = _previous_token(starts, 1), _previous_token(starts, 2)  # [N]
    prev1 = np.where(wrap[None, :] == 0, before1[:, None], t_index)  # [N, L]
    prev2 = np.where(wrap[None, :] == 0, before2[:, None], before1[:, None])  # [N, L]
    for o, offset in enumerate((-1, 0, 1)):
        layer = target_layer + offset
        known = (prev1 != t_index) | (layer <= layers[None, :])  # this token's own layers only up to l
        groups.append(layer_rows(prev1, layer, known, f.previous + o * n_layers * e_per))
    groups.append(layer_rows(prev2, target_layer, everywhere, f.before_previous))
    token_row = f.token + token_ids.astype(np.int64) % TOKEN_BUCKETS  # [N]
    prev_token_row = np.where(before1 >= 0, f.previous_token + token_ids[np.maximum(before1, 0)] % TOKEN_BUCKETS,
                              pad)
    target_row = f.target + (min(distance, MAX_DISTANCE) - 1) * n_layers + target_layer  # [N, L]
    singles = np.stack([np.broadcast_to(token_row[:, None], (n, n_layers)),
                        np.broadcast_to(prev_token_row[:, None], (n, n_layers)), target_row], axis=-1)  # [N, L, 3]
    rows = np.concatenate([*groups, singles], axis=-1)  # [N, L, S]
    return rows, target_token, np.ascontiguousarray(target_layer)


def _rows_at(shape: PredictorShape, f: _Features, experts: np.ndarray, token_ids: np.ndarray, layer: int,
             distance: int) -> tuple[list[int], int]:
    """``_rows`` of one position, the last token of ``experts [T, L, k]`` (one prompt from its first token) at MoE
    ``layer``, in plain integers: the live predictor's per-gate path, where numpy's per-call cost on arrays of a few
    tokens was most of the time. Returns the feature rows ``[S]`` and the target layer (row for row ``_rows``'s,
    tested)."""
    n_layers, e_per, pad = shape.n_layers, shape.experts_per_layer, f.padding
    t = len(experts) - 1
    ahead = layer + distance
    target = ahead % n_layers
    wrap = ahead // n_layers != 0
    before1 = t - 1 if t >= 1 else -1
    before2 = t - 2 if t >= 2 else -1
    prev1, prev2 = (t, before1) if wrap else (before1, before2)
    rows: list[int] = []
    chosen = experts.tolist()  # [T][L][k] plain ints: indexing numpy element by element cost most of the time

    def add(token: int, at: int, known: bool, base: int) -> None:
        if known and token >= 0 and 0 <= at < n_layers:
            first = base + at * e_per
            rows.extend(first + e for e in chosen[token][at])
        else:
            rows.extend([pad] * shape.top_k)

    for r in range(CURRENT_LAYERS):
        add(t, layer - r, True, f.current + r * n_layers * e_per)
    for o, offset in enumerate((-1, 0, 1)):
        at = target + offset
        add(prev1, at, prev1 != t or at <= layer, f.previous + o * n_layers * e_per)
    add(prev2, target, True, f.before_previous)
    rows.append(f.token + int(token_ids[t]) % TOKEN_BUCKETS)
    rows.append(f.previous_token + int(token_ids[before1]) % TOKEN_BUCKETS if before1 >= 0 else pad)
    rows.append(f.target + (min(distance, MAX_DISTANCE) - 1) * n_layers + target)
    return rows, target


def _rows_batch(shape: PredictorShape, f: _Features, experts: np.ndarray, token_ids: np.ndarray,
                known_tokens: np.ndarray, layer: int, distance: int) -> tuple[np.ndarray, int]:
    """``_rows_at`` for many windows at once (the live path with a batch of requests): ``experts [R, T, L, k]`` and
    ``token_ids [R, T]`` left-padded windows whose last ``known_tokens [R]`` (1..T) tokens are real, each taken as a
    prompt from its first real token. Returns rows ``[R, S]`` (row for row ``_rows_at``'s, tested) and the target
    layer."""
    n_layers, e_per, pad = shape.n_layers, shape.experts_per_layer, f.padding
    n, t = len(experts), experts.shape[1] - 1
    ahead = layer + distance
    target = ahead % n_layers
    wrap = ahead // n_layers != 0
    every, before1, before2 = np.ones(n, dtype=bool), known_tokens >= 2, known_tokens >= 3
    blocks: list[np.ndarray] = []

    def add(token: int, at: int, known: np.ndarray, base: int) -> None:
        if token < 0 or not 0 <= at < n_layers:
            blocks.append(np.full((n, shape.top_k), pad, dtype=np.int64))
        else:
            blocks.append(np.where(known[:, None], base + at * e_per + experts[:, token, at], pad))

    for r in range(CURRENT_LAYERS):
        add(t, layer - r, every, f.current + r * n_layers * e_per)
    for o, offset in enumerate((-1, 0, 1)):
        at = target + offset
        if wrap:  # the token's own layers, known up to this one
            add(t, at, every if at <= layer else ~every, f.previous + o * n_layers * e_per)
        else:
            add(t - 1, at, before1, f.previous + o * n_layers * e_per)
    add(t - 1 if wrap else t - 2, target, before1 if wrap else before2, f.before_previous)
    blocks.append((f.token + token_ids[:, t] % TOKEN_BUCKETS)[:, None])
    previous = f.previous_token + token_ids[:, t - 1] % TOKEN_BUCKETS if t >= 1 else np.zeros(n, dtype=np.int64)
    blocks.append(np.where(before1, previous, pad)[:, None])
    blocks.append(np.full((n, 1), f.target + (min(distance, MAX_DISTANCE) - 1) * n_layers + target))
    return np.concatenate(blocks, axis=1).astype(np.int64), target


def _samples(shape: PredictorShape, experts: np.ndarray, token_ids: np.ndarray, prompt_offsets: np.ndarray,
             distances: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Every (token, layer, distance) whose target exists: ``rows [M, S]``, ``targets [M, k]`` (the experts chosen
    there) and ``target_layers [M]``."""
    rows_all, targets_all, layers_all = [], [], []
    for d in distances:
        rows, target_token, target_layer = _rows(shape, experts, token_ids, prompt_offsets, d)
        keep = target_token >= 0
        rows_all.append(rows[keep])
        targets_all.append(experts[target_token[keep], target_layer[keep]].astype(np.int64))  # [M_d, k]
        layers_all.append(target_layer[keep])
    return (torch.from_numpy(np.concatenate(rows_all)), torch.from_numpy(np.concatenate(targets_all)),
            np.concatenate(layers_all))


def _train(shape: PredictorShape, rows: torch.Tensor, targets: torch.Tensor, target_layers: np.ndarray, epochs: int,
           batch: int, lr: float, min_steps: int, rng: np.random.Generator) -> _Net:
    """Binary cross-entropy, batches of one target layer each (one head per batch), one-cycle learning rate."""
    f = _Features(shape)
    net = _Net(shape, f.n_rows, f.padding)
    with torch.no_grad():
        net.table[f.padding] = 0
    net.table.requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    table_opt = _RowAdam(net.table.data, f.padding, lr)
    by_layer = [np.flatnonzero(target_layers == j) for j in range(shape.n_layers)]
    per_epoch = max(1, sum(-(-len(ix) // batch) for ix in by_layer))
    epochs = max(epochs, -(-min_steps // per_epoch))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        batches = [(j, shuffled[i: i + batch]) for j, ix in enumerate(by_layer)
                   for shuffled in [rng.permutation(ix)] for i in range(0, len(ix), batch)]
        for b in rng.permutation(len(batches)):
            j, ix = batches[b]
            ix_t = torch.from_numpy(ix)
            rows_used, inverse = torch.unique(rows[ix_t], return_inverse=True)  # [U], [B, S]
            sub = net.table[rows_used].requires_grad_()  # [U, H]
            logits = net.logits(F.embedding_bag(inverse, sub, mode="sum"), j)  # [B, E]
            target = torch.zeros_like(logits).scatter_(1, targets[ix_t], 1.0)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            assert sub.grad is not None
            table_opt.lr = float(sched.get_last_lr()[0])
            table_opt.step(rows_used, sub.grad)
            sched.step()
    return net


@torch.no_grad()
def _temperature(net: _Net, rows: torch.Tensor, targets: torch.Tensor, target_layers: np.ndarray) -> float:
    """The logit temperature that minimises cross-entropy on held-out samples (a grid: one number)."""
    logits, labels = [], []
    for j in np.unique(target_layers):
        ix = torch.from_numpy(np.flatnonzero(target_layers == j))
        out = net(rows[ix], int(j))  # [B, E]
        logits.append(out)
        labels.append(torch.zeros_like(out).scatter_(1, targets[ix], 1.0))
    x, y = torch.cat(logits), torch.cat(labels)
    grid = [0.5 + 0.05 * i for i in range(51)]
    losses = [float(F.binary_cross_entropy_with_logits(x / t, y)) for t in grid]
    return grid[int(np.argmin(losses))]


class RoutingPredictor:
    """Fit on a trace's routing, then predict, for every (token, layer), the experts ``d`` layers ahead."""

    def __init__(self, shape: PredictorShape, net: _Net) -> None:
        self.shape = shape
        self.net = net.eval()
        self._features = _Features(shape)

    @classmethod
    def fit(cls, experts: np.ndarray, token_ids: np.ndarray, prompt_offsets: np.ndarray, experts_per_layer: int,
            distances: tuple[int, ...] = (1, 2, 3), epochs: int = 3, batch: int = 512, lr: float = 3e-3,
            hidden: int = 256, calibration_fraction: float = 0.1, min_steps: int = 500, seed: int = 0,
            threads: int = 2) -> RoutingPredictor:
        """Train on ``experts [N, L, k]`` (local ids), ``token_ids [N]``, ``prompt_offsets [P+1]`` for every distance
        in ``distances`` at once (they share what they learn), then scale the logits (one temperature) so that
        probabilities match frequencies on the last ``calibration_fraction`` of the prompts, held out of training.
        A short trace gets more epochs, up to ``min_steps`` optimizer steps. Deterministic for a seed and a thread
        count."""
        started = time.perf_counter()
        n_layers, k = experts.shape[1:]
        shape = PredictorShape(n_layers, experts_per_layer, k, hidden)
        n_prompts = len(prompt_offsets) - 1
        cut = n_prompts - round(n_prompts * calibration_fraction) if n_prompts > 1 else n_prompts
        at = int(prompt_offsets[cut])
        fitted = _samples(shape, experts[:at], token_ids[:at], prompt_offsets[: cut + 1], distances)
        held_out = _samples(shape, experts[at:], token_ids[at:], prompt_offsets[cut:] - at, distances)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(seed)
            net = _train(shape, *fitted, epochs, batch, lr, min_steps, np.random.default_rng(seed))
            if len(held_out[0]):
                net.temperature.fill_(_temperature(net, *held_out))
        finally:
            torch.set_num_threads(threads_before)
        log.info("routing predictor: %d samples, %d epochs, temperature %.2f, fitted in %.1f s", len(fitted[0]),
                 epochs, float(net.temperature), time.perf_counter() - started)
        return cls(shape, net)

    @torch.no_grad()
    def probabilities(self, experts: np.ndarray, token_ids: np.ndarray, prompt_offsets: np.ndarray,
                      distance: int, batch: int = 8192) -> np.ndarray:
        """``[N, L, E]`` float32: per (token, layer), the probability that each expert is chosen ``distance`` layers
        ahead, from what is known at that layer."""
        n, n_layers, _ = experts.shape
        rows, _, target_layer = _rows(self.shape, experts, token_ids, prompt_offsets, distance)
        out = np.empty((n, n_layers, self.shape.experts_per_layer), dtype=np.float32)
        for layer in range(n_layers):
            j = int(target_layer[0, layer])
            for i in range(0, n, batch):
                logits = self.net(torch.from_numpy(np.ascontiguousarray(rows[i: i + batch, layer])), j)
                out[i: i + batch, layer] = torch.sigmoid(logits / self.net.temperature).numpy()
        return out

    @torch.no_grad()
    def predict_at(self, experts: np.ndarray, token_ids: np.ndarray, layer: int,
                   distances: tuple[int, ...]) -> dict[int, np.ndarray]:
        """At MoE ``layer`` of the last token of a window of one prompt (``experts [T, L, k]``, ``token_ids [T]``,
        oldest first; the window's first token is taken as the prompt's first): per distance ``d``, ``[E]`` float32
        the probability of every expert ``d`` layers ahead. The features of ``probabilities`` (``_rows``), for one
        position: the last token's layers after ``layer`` are never read, and a window of the last three tokens
        gives what the whole prompt would."""
        per_distance = [_rows_at(self.shape, self._features, experts, token_ids, layer, d) for d in distances]
        bags = F.embedding_bag(torch.tensor([rows for rows, _ in per_distance]), self.net.table, mode="sum",
                               padding_idx=self.net.padding)  # [D, H]: one bag per distance
        logits = self.net.logits_each(bags, torch.tensor([target for _, target in per_distance]))  # [D, E]
        probs = torch.sigmoid(logits / self.net.temperature).numpy()
        return {d: probs[i] for i, d in enumerate(distances)}

    @torch.no_grad()
    def predict_windows(self, experts: np.ndarray, token_ids: np.ndarray, known_tokens: np.ndarray, layer: int,
                        distance: int) -> np.ndarray:
        """``predict_at`` for many windows at once (left-padded ``experts [R, T, L, k]``, ``token_ids [R, T]``, the
        last ``known_tokens [R]`` of each real) at one layer and distance: ``[R, E]`` float32. The live path's cost
        per gate with a batch of requests: one numpy pass for the features, one embedding bag, one MLP."""
        rows, target = _rows_batch(self.shape, self._features, experts, token_ids, known_tokens, layer, distance)
        logits = self.net(torch.from_numpy(rows), target)  # [R, E]
        return torch.sigmoid(logits / self.net.temperature).numpy()

    def save(self, path: Path) -> None:
        state = {name: t.detach().numpy() for name, t in self.net.state_dict().items()}
        state.update({f"shape.{k}": np.asarray(v, dtype=np.int64) for k, v in asdict(self.shape).items()})
        np.savez(path, **state)

    @classmethod
    def load(cls, path: Path) -> RoutingPredictor:
        data = np.load(path, allow_pickle=False)
        shape = PredictorShape(**{k.removeprefix("shape."): int(data[k]) for k in data.files if k.startswith("shape.")})
        f = _Features(shape)
        net = _Net(shape, f.n_rows, f.padding)
        net.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files if not k.startswith("shape.")})
        return cls(shape, net)
