"""Why pipelining gains less here than on two machines: the device and the edge share one memory bus.

    python docs/bench/contention/measure.py > docs/bench/contention/results.json

Times one cached decode step of the Qwen pair's target (bf16) and draft (int8), each in its own process with
one torch thread, first alone and then both at once. Both are memory-bound, so running them together (what
PEARL-style pipelining does: draft while the edge verifies) slows each of them down on this 2-core machine,
which two real machines would not.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import warnings

PAIR = (("qwen2.5-coder-1.5b", "bf16"), ("qwen2.5-coder-1.5b", "int8"))
SECONDS = 8.0


def _worker(name: str, dtype: str, start, out) -> None:
    warnings.filterwarnings("ignore")
    import torch

    from draftwire.shared.models.runtime import load_model

    torch.set_num_threads(1)
    model = load_model(name, dtype, progress=False)
    seq = model.new_sequence()
    tokens = model.encode("def quicksort(arr):")
    seq.next_logits(tokens)
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < SECONDS:
        tokens.append(100 + n % 50)
        seq.next_logits(tokens)
        n += 1
    out.put((f"{name}:{dtype}", (time.perf_counter() - t0) / n * 1000))


def _steps(models) -> dict[str, float]:
    start, out = mp.Event(), mp.Queue()
    procs = [mp.Process(target=_worker, args=(*m, start, out)) for m in models]
    for p in procs:
        p.start()
    time.sleep(60)  # loading both (int8 quantizes at load) takes well under a minute
    start.set()
    got = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    return got


def main() -> None:
    mp.set_start_method("spawn")
    alone = {**_steps([PAIR[0]]), **_steps([PAIR[1]])}
    together = _steps(list(PAIR))
    print(json.dumps({"step_ms_alone": alone, "step_ms_together": together,
                      "slowdown": {k: together[k] / alone[k] for k in alone}}, indent=1))


if __name__ == "__main__":
    main()
