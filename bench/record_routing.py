"""Record a model's live routing over corpus text, for ``python -m training.routing_fit`` (the routing predictor).

    python bench/record_routing.py --out rec.npz [--model-path DIR] [--corpus FILE] [--prompts 64]
                                   [--prompt-tokens 48] [--new-tokens 16]

Starts the runtime with ``--record-trace`` (``lru``, whole-model cache: the policy does not change routing), sends
``--prompts`` greedy requests whose prompts are consecutive pieces of the corpus (default: the Python standard
library's sources, as ``--train-predictor`` reads them), and stops it; the trace holds each prompt's tokens and the
generated ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.runtime_process import RuntimeProcess
from models.checkpoint import open_checkpoint
from models.default_model import ensure_default_checkpoint
from training.predictor_training import corpus_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="trace file to write (.npz)")
    p.add_argument("--model-path", type=Path, default=None, help="checkpoint (default: the embedded default model)")
    p.add_argument("--corpus", type=Path, default=None, help="text file (default: the standard library's sources)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    checkpoint = args.model_path or ensure_default_checkpoint()
    ckpt = open_checkpoint(checkpoint)
    ids = corpus_ids(checkpoint, args.corpus, args.prompts * args.prompt_tokens, int(ckpt.config["vocab_size"]))
    n_experts = ckpt.layout(n_slots=4, n_chunks=1, compute_dtype="float32").n_experts
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rt = RuntimeProcess(Path(tmp) / "record", checkpoint, "--policy", "lru", "--cache-experts", str(n_experts),
                            "--record-trace", str(args.out.resolve()))
        try:
            with rt.client() as client:
                for i in range(args.prompts):
                    prompt = ids[i * args.prompt_tokens: (i + 1) * args.prompt_tokens]
                    client.generate(prompt_ids=prompt, max_new_tokens=args.new_tokens)
        finally:
            rt.stop()
    print(f"recorded {args.prompts} prompts of {args.prompt_tokens} + {args.new_tokens} tokens into {args.out} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
