"""Fit the routing predictor on recorded routing, for ``launch.py --routing-predictor``.

    python launch.py --model qwen-moe --record-trace rec.npz        # serve requests; each one's routing is kept
    python -m training.routing_fit --trace rec.npz --out pred.npz [--lookahead 2] [--eval-fraction 0.1]
    python launch.py --model qwen-moe --routing-predictor pred.npz --lookahead 2

It trains on the trace's ``model_token_ids`` (the ids the live runtime reports) when the trace has them (traces of
``--record-trace`` do), else on ``token_ids`` (a trace of another tokenizer: fine for replay, not for serving). The
distances trained are 1, 2, 3, ``--lookahead`` and ``L`` (the outlook one token on); a runtime's ``--lookahead`` must
be one of them. The last ``--eval-fraction`` of the prompts are held out and the share of the true top-k among the k
named is printed per distance; the file written is the predictor fitted on the rest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from training.routing_predictor import RoutingPredictor

log = logging.getLogger(__name__)


def precision(predictor: RoutingPredictor, experts: np.ndarray, token_ids: np.ndarray, offsets: np.ndarray,
              distance: int) -> float | None:
    """Share of the true top-k among the k most probable, over every (token, layer) whose target is in its prompt
    (None if there is none)."""
    n, n_layers, k = experts.shape
    probs = predictor.probabilities(experts, token_ids, offsets, distance)  # [N, L, E]
    named = np.argsort(-probs, axis=-1, kind="stable")[..., :k]  # [N, L, k]
    ahead = np.arange(n_layers) + distance  # [L]
    ends = np.repeat(offsets[1:], np.diff(offsets))  # [N]
    target_t = np.arange(n)[:, None] + ahead[None, :] // n_layers  # [N, L]
    valid = target_t < ends[:, None]
    true = experts[np.minimum(target_t, n - 1), np.broadcast_to(ahead % n_layers, (n, n_layers))]  # [N, L, k]
    hits = (named[..., :, None] == true[..., None, :]).any(-1).sum(-1)  # [N, L]
    return float(hits[valid].sum() / (valid.sum() * k)) if valid.any() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.routing_fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, required=True, help="a routing trace (.npz, e.g. from --record-trace)")
    p.add_argument("--out", type=Path, required=True, help="where to write the predictor (.npz)")
    p.add_argument("--lookahead", type=int, default=2, help="the runtime's --lookahead, trained too (default 2)")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="last share of the prompts held out and scored (default 0.1; 0: fit on all)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    data = np.load(args.trace, allow_pickle=False)
    experts = data["experts"].astype(np.int64)  # [N, L, k]
    offsets = data["prompt_offsets"].astype(np.int64)
    if "model_token_ids" in data.files:
        token_ids = data["model_token_ids"].astype(np.int64)
    else:
        log.warning("%s has no model_token_ids: fitting on token_ids, which a runtime of another tokenizer does not "
                    "report", args.trace)
        token_ids = data["token_ids"].astype(np.int64)
    per_layer = int(data["experts_per_layer"]) if "experts_per_layer" in data.files else int(experts.max()) + 1
    n_layers = experts.shape[1]
    distances = tuple(sorted({1, 2, 3, args.lookahead, n_layers}))
    n_prompts = len(offsets) - 1
    cut = n_prompts - round(n_prompts * args.eval_fraction)
    if not 0 < cut <= n_prompts:
        raise SystemExit(f"--eval-fraction {args.eval_fraction} leaves no prompt of {n_prompts} to fit on")
    at = int(offsets[cut])
    predictor = RoutingPredictor.fit(experts[:at], token_ids[:at], offsets[: cut + 1], per_layer, distances=distances,
                                     epochs=args.epochs, hidden=args.hidden, seed=args.seed, threads=args.threads)
    if cut < n_prompts:
        held = (experts[at:], token_ids[at:], offsets[cut:] - at)
        for d in distances:
            score = precision(predictor, *held, d)
            print(f"d={d}: held-out precision {score if score is None else round(score, 3)} "
                  f"({n_prompts - cut} prompts)")
    predictor.save(args.out)
    print(f"wrote {args.out} ({n_layers} MoE layers x {per_layer} experts, top-{experts.shape[2]}, distances "
          f"{list(distances)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
