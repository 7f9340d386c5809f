"""``--train-predictor``: trace the model's routing over a corpus, train one small MLP per (source MoE layer,
distance), and compare it with two baselines on the same held-out tokens.

- Trace: the model runs in this process (transformers, eager experts) over the corpus in fixed-length windows; a
  forward hook on every MoE router records its input (the MoE layer's input, ``[T, H]``) and the experts it chose.
- Targets: from layer ``l`` at distance ``d`` the target is MoE layer ``l + d`` of the same token, or, past the
  last layer, layer ``l + d - L`` of the next token (what the runtime's predictor is asked).
- Split 9:1 by window (no token of a held-out window is trained on). Accuracy = share of the predicted top-k that the
  gate chose, on held-out tokens only.
- Baselines: skip-layer gate reuse (the source input through the target layer's own router) and a token-id
  frequency table (per input token id, the target layer's most chosen experts in the training part).

The predictor file is safetensors: ``w1/b1/w2/b2`` per (layer, distance) plus metadata, no pickle.
"""

from __future__ import annotations

import json
import logging
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

DISTANCES = (1, 2, 3)


@dataclass(frozen=True)
class TrainingConfig:
    """How much to trace and train."""

    tokens: int = 24_576
    """Corpus tokens to trace."""
    window: int = 128
    """Tokens per forward pass (a window is the unit of the 9:1 split)."""
    hidden_units: int = 256
    """Width of each MLP's hidden layer."""
    epochs: int = 8
    """Passes over the training part per MLP."""
    seed: int = 0
    """Seed of the split and of the MLPs."""
    distances: tuple[int, ...] = DISTANCES
    """Distances to train an MLP for (the runtime asks for ``--lookahead`` only)."""


@dataclass
class Trace:
    token_ids: torch.Tensor  # [W, S] input token of each position
    hidden: torch.Tensor  # [L, W, S, H] MoE-layer inputs
    chosen: torch.Tensor  # [L, W, S, k] experts the gates chose


def default_corpus_text(max_bytes: int) -> str:
    """Text that ships with the machine: the Python standard library's own source files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    return "".join(parts)


def corpus_ids(checkpoint: Path, corpus: Path | None, tokens: int, vocab_size: int) -> list[int]:
    text = corpus.read_text(errors="replace") if corpus is not None else default_corpus_text(tokens * 8)
    if (checkpoint / "tokenizer.json").is_file() or (checkpoint / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(checkpoint)(text, add_special_tokens=False)["input_ids"]
    else:  # UTF-8 byte values (DESIGN section 5): every checkpoint with >= 256 ids can be traced
        if vocab_size < 256:
            raise ValueError(f"no tokenizer and a vocabulary of {vocab_size} < 256 ids: cannot feed bytes")
        ids = list(text.encode())
    if len(ids) < tokens:
        raise ValueError(f"the corpus holds {len(ids)} tokens, {tokens} are needed")
    return ids[:tokens]


def collect_trace(model: nn.Module, moe_layers: tuple[int, ...], ids: list[int], window: int) -> Trace:
    n_windows = len(ids) // window
    token_ids = torch.tensor(ids[: n_windows * window]).view(n_windows, window)
    device = next(model.parameters()).device
    records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(moe_layers))}
    handles = []
    for i, layer in enumerate(moe_layers):
        def hook(module: nn.Module, args: tuple, output: tuple, i: int = i) -> None:
            records[i].append((args[0].detach().reshape(-1, args[0].shape[-1]).clone(), output[2].detach().clone()))

        handles.append(model.model.layers[layer].mlp.gate.register_forward_hook(hook))  # type: ignore[union-attr,index]
    try:
        with torch.inference_mode():
            for w in range(n_windows):
                model(token_ids[w : w + 1].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # float32 on the CPU whatever the model's device and dtype: the MLPs are trained there
    hidden = torch.stack([torch.stack([h for h, _ in records[i]]) for i in records]).float().cpu()  # [L, W, S, H]
    chosen = torch.stack([torch.stack([c for _, c in records[i]]) for i in records]).cpu()  # [L, W, S, k]
    return Trace(token_ids, hidden, chosen)


def pairs(trace: Trace, source: int, distance: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source input [N, H], target choices [N, k], source token ids [N]) for one (layer, distance)."""
    n_layers = trace.hidden.shape[0]
    target, shift = (source + distance) % n_layers, (source + distance) // n_layers
    seq = trace.hidden.shape[2]
    x = trace.hidden[source][:, : seq - shift]  # [W, S', H]
    y = trace.chosen[target][:, shift:]  # [W, S', k]
    t = trace.token_ids[:, : seq - shift]  # [W, S']
    return x, y, t


class ExpertMlp(nn.Module):
    def __init__(self, hidden_size: int, units: int, n_experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, units), nn.GELU(), nn.Linear(units, n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, E]
        return self.net(x)


def topk_accuracy(predicted: torch.Tensor, chosen: torch.Tensor) -> float:
    """Share of the predicted top-k ([N, k]) that the gate chose ([N, k])."""
    hits = (predicted.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1)  # [N, k]
    return hits.float().mean().item()


def train_one(x: torch.Tensor, y: torch.Tensor, n_experts: int, cfg: TrainingConfig) -> ExpertMlp:
    torch.manual_seed(cfg.seed)
    mlp = ExpertMlp(x.shape[-1], cfg.hidden_units, n_experts)
    target = torch.zeros(len(y), n_experts).scatter_(1, y, 1.0)  # k-hot [N, E]
    optimiser = torch.optim.Adam(mlp.parameters(), lr=2e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 256):
            batch = order[start : start + 256]
            optimiser.zero_grad()
            loss = loss_fn(mlp(x[batch]), target[batch])
            loss.backward()
            optimiser.step()
    return mlp.eval()


def train_predictor(checkpoint: Path, out: Path, corpus: Path | None, cfg: TrainingConfig) -> list[dict]:
    """Trace, train, evaluate, save; returns one row per (layer, distance) with the three accuracies."""
    from transformers import AutoModelForCausalLM

    from models.checkpoint import load_router_weights, open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    layout = ckpt.layout(n_slots=int(ckpt.config["num_experts_per_tok"]), n_chunks=1, compute_dtype="float32")
    # grouped_mm: the same routing as the eager loop (float rounding aside), about 9x faster to trace on the CPU
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="grouped_mm")
    started = time.perf_counter()
    ids = corpus_ids(checkpoint, corpus, cfg.tokens, int(ckpt.config["vocab_size"]))
    trace = collect_trace(model, layout.moe_layers, ids, cfg.window)
    log.info("traced %d tokens in %.1f s", trace.token_ids.numel(), time.perf_counter() - started)
    routers = load_router_weights(ckpt, layout)  # [L, E, H]
    rows = train_from_trace(trace, routers, layout.top_k, out, cfg)
    log.info("predictor written to %s in %.1f s total", out, time.perf_counter() - started)
    return rows


def train_from_trace(trace: Trace, routers: torch.Tensor, top_k: int, out: Path, cfg: TrainingConfig) -> list[dict]:
    """Train, evaluate and save the MLPs of a recorded trace; ``routers`` [L, E, H] float32 for gate reuse."""
    n_layers, n_experts, hidden_size = routers.shape
    k = top_k
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(trace.token_ids.shape[0], generator=generator)
    n_test = max(1, len(order) // 10)
    test_w, train_w = order[:n_test], order[n_test:]
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for source in range(n_layers):
        for distance in cfg.distances:
            x, y, t = pairs(trace, source, distance)
            target_layer = (source + distance) % n_layers
            x_train, y_train = x[train_w].reshape(-1, x.shape[-1]), y[train_w].reshape(-1, k)
            x_test, y_test = x[test_w].reshape(-1, x.shape[-1]), y[test_w].reshape(-1, k)
            t_train, t_test = t[train_w].reshape(-1), t[test_w].reshape(-1)
            mlp = train_one(x_train, y_train, n_experts, cfg)
            with torch.no_grad():
                learned = topk_accuracy(mlp(x_test).topk(k, dim=-1).indices, y_test)
            reuse = topk_accuracy((x_test @ routers[target_layer].T).topk(k, dim=-1).indices, y_test)
            frequency = topk_accuracy(token_frequency_predict(t_train, y_train, t_test, n_experts, k), y_test)
            rows.append({"layer": source, "distance": distance, "learned": learned, "gate_reuse": reuse,
                         "token_frequency": frequency, "test_tokens": len(y_test)})
            for name, value in mlp.state_dict().items():
                tensors[f"{source}.{distance}.{name}"] = value.contiguous()
    meta = {"hidden_size": str(hidden_size), "experts_per_layer": str(n_experts), "top_k": str(k),
            "n_layers": str(n_layers), "distances": json.dumps(cfg.distances), "units": str(cfg.hidden_units),
            "evaluation": json.dumps(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return rows


def token_frequency_predict(t_train: torch.Tensor, y_train: torch.Tensor, t_test: torch.Tensor, n_experts: int,
                            k: int) -> torch.Tensor:
    vocab = int(max(t_train.max(), t_test.max())) + 1
    counts = torch.zeros(vocab, n_experts)
    counts.index_put_((t_train.repeat_interleave(k), y_train.reshape(-1)), torch.ones(y_train.numel()),
                      accumulate=True)
    overall = counts.sum(0, keepdim=True)  # unseen token ids fall back to the global frequency
    table = torch.where(counts.sum(1, keepdim=True) > 0, counts, overall)
    return table[t_test].topk(k, dim=-1).indices  # [N, k]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'layer':>5} {'dist':>4} {'learned':>8} {'gate reuse':>10} {'token freq':>10} {'test tokens':>11}"]
    for r in rows:
        lines.append(f"{r['layer']:>5} {r['distance']:>4} {r['learned']:>8.3f} {r['gate_reuse']:>10.3f} "
                     f"{r['token_frequency']:>10.3f} {r['test_tokens']:>11}")
    for d in sorted({r["distance"] for r in rows}):
        sel = [r for r in rows if r["distance"] == d]
        mean = {key: sum(r[key] for r in sel) / len(sel) for key in ("learned", "gate_reuse", "token_frequency")}
        lines.append(f"{'mean':>5} {d:>4} {mean['learned']:>8.3f} {mean['gate_reuse']:>10.3f} "
                     f"{mean['token_frequency']:>10.3f}")
    return "\n".join(lines)


class LearnedPredictor:
    """The MLPs of a predictor file, for the predictor worker."""

    def __init__(self, path: Path, hidden_size: int, experts_per_layer: int) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        if int(meta["hidden_size"]) != hidden_size or int(meta["experts_per_layer"]) != experts_per_layer:
            raise ValueError(f"{path} was trained for another model (hidden {meta['hidden_size']}, "
                             f"{meta['experts_per_layer']} experts per layer)")
        tensors = load_file(str(path))
        self.top_k = int(meta["top_k"])
        self.mlps: dict[tuple[int, int], ExpertMlp] = {}
        for key in {k.rsplit(".net.", 1)[0] for k in tensors}:
            source, distance = map(int, key.split("."))
            mlp = ExpertMlp(hidden_size, int(meta["units"]), experts_per_layer)
            mlp.load_state_dict({name.split(".", 2)[2]: value for name, value in tensors.items()
                                 if name.startswith(f"{key}.")})
            self.mlps[(source, distance)] = mlp.eval()

    def predict(self, hidden: torch.Tensor, source_layer: int, distance: int) -> list[int] | None:
        mlp = self.mlps.get((source_layer, distance))
        if mlp is None:
            return None
        with torch.no_grad():
            top = mlp(hidden.float()).topk(self.top_k, dim=-1).indices  # [n, k]
        return sorted(set(top.flatten().tolist()))
