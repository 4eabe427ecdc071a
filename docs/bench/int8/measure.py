"""How the int8 draft's down_proj layers are quantized: argmax agreement with the target and step time.

    python docs/bench/int8/measure.py qwen2.5-coder-1.5b bf16 smollm2-135m fp32 > docs/bench/int8/results.json

Three ways to run down_proj (every other Linear is dynamic int8 in all three): dynamic int8 like the rest,
kept in fp32, and weight-only int8 (what `int8` does now). Agreement: the draft's greedy choice vs the
target's own greedy continuation (teacher-forced), 6 bench prompts x 48 tokens. Step: one cached decode step,
one torch thread. This is the measurement behind the README's dtype paragraph.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch

from draftwire.services.cli.remote import load_prompts
from draftwire.shared.models.runtime import load_model, quantize_int8

VARIANTS = ("dynamic", "fp32", "weight-only")
USAGE = "usage: python docs/bench/int8/measure.py MODEL TARGET_DTYPE [MODEL TARGET_DTYPE ...]"


def build(name: str, variant: str):
    model = load_model(name, "fp32", progress=False)
    if variant == "dynamic":
        quantize_int8(model.model, weight_only=())
    elif variant == "weight-only":
        quantize_int8(model.model)
    else:  # fp32: hide down_proj from the quantizer, then put it back untouched
        originals = {n: m for n, m in model.model.named_modules() if n.endswith("down_proj")}
        for n in originals:
            parent, _, attr = n.rpartition(".")
            setattr(model.model.get_submodule(parent), attr, torch.nn.Identity())
        quantize_int8(model.model)
        for n, m in originals.items():
            parent, _, attr = n.rpartition(".")
            setattr(model.model.get_submodule(parent), attr, m)
    return model


def agreement(model, refs) -> float:
    hit = total = 0
    for n0, full in refs:
        pred = model.new_sequence().next_logits(full[:-1], n_out=len(full) - n0).argmax(-1).tolist()
        hit += sum(int(a == b) for a, b in zip(pred, full[n0:]))
        total += len(pred)
    return hit / total


def step_ms(model, prompt: str, n: int = 24) -> float:
    seq = model.new_sequence()
    tokens = model.encode(prompt)
    seq.next_logits(tokens)
    for i in range(3):
        tokens.append(100 + i)
        seq.next_logits(tokens)
    t0 = time.perf_counter()
    for i in range(n):
        tokens.append(200 + i)
        seq.next_logits(tokens)
    return (time.perf_counter() - t0) / n * 1000


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(f"{USAGE}\nerror: expected model and target dtype pairs, got {argv}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    prompts = [row["prompt"] for row in load_prompts(None, 6)]
    out = []
    for name, target_dtype in zip(argv[::2], argv[1::2]):
        target = load_model(name, target_dtype, progress=False)
        refs = []
        for p in prompts:
            ids = target.encode(p)
            gen = target.model.generate(torch.tensor([ids]), max_new_tokens=48, min_new_tokens=48, do_sample=False)
            refs.append((len(ids), gen[0].tolist()))
        row = {"model": name, "target_dtype": target_dtype, "target_step_ms": step_ms(target, prompts[0])}
        del target
        for variant in VARIANTS:
            draft = build(name, variant)
            row[variant] = {"agreement": agreement(draft, refs), "step_ms": step_ms(draft, prompts[0])}
            del draft
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
