"""What one batched forward pass costs, and where the time goes: milliseconds per pass for a few batch shapes,
then the torch profiler's top operators for one shape. One torch thread (as the services run), no sampling,
no NATS. Run it on two commits in turn to compare them; prints and writes JSON.

    python docs/bench/batching/pass_cost.py smollm2-135m fp32 OUT.json
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from draftwire.shared.models.batched_forward import next_logits_batch
from draftwire.shared.models.runtime import load_model

SHAPES = ((1, 1), (1, 5), (6, 2), (8, 3), (16, 3))  # (rows, new tokens per row)
PROFILED = (6, 2)  # the verifier's typical pass at 16 sessions on two cores


def pass_ms(model, rows: int, new: int, context: int = 150, repeats: int = 7) -> tuple[float, Callable[[], None]]:
    """Best-of-`repeats` milliseconds of one pass; rows' contexts differ (context + 7 * row tokens)."""
    rng = random.Random(rows * 100 + new)
    seqs = [model.new_sequence() for _ in range(rows)]
    history = [[rng.randrange(model.vocab_size) for _ in range(context + 7 * r)] for r in range(rows)]
    for seq, h in zip(seqs, history, strict=True):
        seq.next_logits(h, 1)

    def once() -> None:
        tokens = [h + [rng.randrange(model.vocab_size) for _ in range(new)] for h in history]
        next_logits_batch(seqs, tokens, [new] * rows)
        for seq, h in zip(seqs, history, strict=True):
            seq.rollback(len(h))

    once()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return best * 1000, once


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    name, dtype, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = load_model(name, dtype, progress=False)
    result = {"model": name, "dtype": dtype, "threads": 1, "pass_ms": {}}
    for rows, new in SHAPES:
        ms, once = pass_ms(model, rows, new)
        result["pass_ms"][f"{rows}x{new}"] = ms
        print(f"{name} {dtype}: {rows:>2} rows x {new} tokens: {ms:6.1f} ms a pass", flush=True)
        if (rows, new) == PROFILED:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    once()
            ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            result["profile"] = {"shape": f"{rows}x{new}",
                                 "self_ms_per_pass": {e.key: e.self_cpu_time_total / 5000 for e in ops},
                                 "total_ms_per_pass": total / 5000}
            for e in ops:
                print(f"    {e.key:<50} {e.self_cpu_time_total / 5000:6.1f} ms a pass", flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
