"""The batching ceiling of this machine: raw target forward throughput (tokens/s) at 1 and N sessions.

What the verifier can at best reach in replay mode: one packed `next_logits_batch` forward over N sessions,
each verifying gamma + 1 = 5 tokens after a ~100-token context, one torch thread (as the services run), no
sampling, no NATS. Prints and writes JSON.

    python docs/bench/batching/ceiling.py smollm2-135m fp32 docs/bench/batching/ceiling-smollm2-fp32.json
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings

import torch

from draftwire.shared.models.batched_forward import next_logits_batch
from draftwire.shared.models.runtime import load_model


def tokens_per_s(model, n: int, repeats: int, context: int = 100, new: int = 5) -> float:
    rng = random.Random(n)
    seqs = [model.new_sequence() for _ in range(n)]
    history = [[rng.randrange(model.vocab_size) for _ in range(context)] for _ in range(n)]
    for seq, h in zip(seqs, history, strict=True):
        seq.next_logits(h, 1)
    best = float("inf")
    for _ in range(repeats):
        tokens = [h + [rng.randrange(model.vocab_size) for _ in range(new)] for h in history]
        t0 = time.perf_counter()
        next_logits_batch(seqs, tokens, [new] * n)
        best = min(best, time.perf_counter() - t0)
        for seq, h in zip(seqs, history, strict=True):
            seq.rollback(len(h))
    return n * new / best


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    name, dtype, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = load_model(name, dtype, progress=False)
    sizes = (1, 4, 16)
    rates = {n: tokens_per_s(model, n, repeats=5) for n in sizes}
    result = {"model": name, "dtype": dtype, "threads": 1, "tokens_per_forward_row": 5, "context": 100,
              "tokens_per_s": rates, "ratio_16_to_1": rates[16] / rates[1]}
    for n in sizes:
        print(f"{name} {dtype}: {n:>2} sessions x 5 tokens: {rates[n]:.0f} tokens/s ({rates[n] / rates[1]:.2f}x)")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
