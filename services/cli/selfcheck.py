"""`draftwire selfcheck`: greedy speculative output against the target's own transformers `generate`.

Greedy speculative decoding must reproduce the target's greedy tokens exactly. This runs every prompt of the
set (`--prompts`: a completion as it is, a chat through the target's chat template) through the in-process
engine for each draft and mode and compares token ids with `model.generate(do_sample=False)`. Where a token
differs, it reports the target's logit gap between the two candidates at that position: a gap near float32
rounding means a near-tie that a multi-token forward (batched matmuls summed in another order) can
legitimately flip, not a verification bug.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from draftwire.shared.bench import prompt_ids
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.models.runtime import LoadedModel, load_model


def hf_greedy(target: LoadedModel, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = target.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=target.eos_token_ids[0] if target.eos_token_ids else 0,
        )
    return out[0, len(prompt_ids) :].tolist()


def logit_gap(target: LoadedModel, prefix: list[int], want: int, got: int) -> float:
    """Target float32 logit of the reference token minus that of the token speculation emitted."""
    seq = target.new_sequence()
    logits = seq.next_logits(prefix, 1)[0]
    return float(logits[want] - logits[got])


def run_selfcheck(
    prompts: list[dict],
    target: LoadedModel,
    drafts: dict[str, LoadedModel],
    modes: list[str],
    n_tokens: int,
    gamma: int = 4,
    k: int = 8,
) -> dict:
    params = SamplingParams(temperature=0.0, min_new_tokens=n_tokens, max_new_tokens=n_tokens)
    report: dict = {"n_tokens": n_tokens, "gamma": gamma, "k": k, "target": f"{target.name}:{target.dtype}",
                    "prompts": len(prompts), "pairs": {}}
    refs = {}
    for row in prompts:
        ids = prompt_ids(target, row)
        refs[row["id"]] = (ids, hf_greedy(target, ids, n_tokens))
    for label, draft in drafts.items():
        engine = LocalEngine(target, draft)
        for mode in modes:
            spec = SpecParams(mode=mode, gamma=gamma, k=k)
            agg = {"identical": 0, "mismatches": [], "drafted": 0, "accepted": 0, "rounds": 0, "tokens": 0,
                   "uplink_bytes": 0, "wall_s": 0.0}
            for row in prompts:
                ids, ref = refs[row["id"]]
                out = engine.generate(ids, params, spec)
                s = out.stats.summary()
                for key in ("drafted", "accepted", "rounds", "uplink_bytes", "wall_s"):
                    agg[key] += s[key]
                agg["tokens"] += s["new_tokens"]
                if out.token_ids == ref:
                    agg["identical"] += 1
                    continue
                i = next(j for j, (a, b) in enumerate(zip(ref, out.token_ids, strict=False)) if a != b)
                agg["mismatches"].append({
                    "prompt": row["id"], "position": i, "reference": ref[i], "speculative": out.token_ids[i],
                    "target_logit_gap": logit_gap(target, ids + ref[:i], ref[i], out.token_ids[i]),
                })
            agg["acceptance_rate"] = agg["accepted"] / agg["drafted"] if agg["drafted"] else 0.0
            agg["mean_tokens_per_round"] = agg["tokens"] / agg["rounds"]
            agg["mean_accepted_per_round"] = agg["accepted"] / agg["rounds"]
            agg["uplink_bytes_per_token"] = agg["uplink_bytes"] / agg["tokens"]
            report["pairs"][f"{label}/{mode}"] = agg
    return report


def cmd_selfcheck(args) -> int:
    from draftwire.services.cli.remote import load_prompts

    prompts = load_prompts(args.prompts, args.num_prompts)
    t0 = time.perf_counter()
    target = load_model(args.target_model, args.target_dtype)
    drafts = {f"{args.draft_model}:{dt}": load_model(args.draft_model, dt) for dt in args.draft_dtypes.split(",")}
    report = run_selfcheck(prompts, target, drafts, args.modes.split(","), args.max_new_tokens, args.gamma, args.k)
    report["elapsed_s"] = time.perf_counter() - t0
    print(f"greedy selfcheck: {len(prompts)} prompts x {args.max_new_tokens} tokens, target {report['target']}, "
          f"gamma={args.gamma} K={args.k}")
    print(f"{'draft/mode':<28} {'identical':>9} {'acceptance':>10} {'tokens/round':>12} {'uplink B/tok':>12}")
    failed = False
    for label, agg in report["pairs"].items():
        print(f"{label:<28} {agg['identical']:>4}/{len(prompts):<4} {agg['acceptance_rate']:>10.3f} "
              f"{agg['mean_tokens_per_round']:>12.2f} {agg['uplink_bytes_per_token']:>12.1f}")
        for m in agg["mismatches"]:
            failed = True
            print(f"   {m['prompt']}: first difference at token {m['position']}: reference {m['reference']} vs "
                  f"{m['speculative']}, target logit gap {m['target_logit_gap']:.3g}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    return 1 if failed else 0
