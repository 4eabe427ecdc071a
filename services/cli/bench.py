"""`draftwire bench`: modes x link profiles x draft-length policies through the real services, plus the
Hugging Face `generate(assistant_model=...)` peer on the same pair and prompts. Writes results.json and plots.

One stack serves the whole run: the link proxy in front of the draft service switches profile between
groups, and every request names its mode, gamma, policy and pipelining. Each link group starts with its own
`ar` baseline (the target alone over the same link, one round trip per token), so every speedup is measured
against a baseline from the same run. Every prompt generates exactly --max-new-tokens tokens (min = max).
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from draftwire.shared.bench import prompt_ids, with_row
from draftwire.shared.core.draft_length_policy import expected_tokens, optimal_gamma
from draftwire.shared.core.link_profile import PROFILES, LinkError, LinkProfile, parse_link
from draftwire.shared.core.params import MODES, SamplingParams, SpecParams

PAIRS = {
    "smollm2": (("smollm2-135m", "int8"), ("smollm2-135m", "fp32")),
    "qwen": (("qwen2.5-coder-1.5b", "int8"), ("qwen2.5-coder-1.5b", "bf16")),
    # drafts with another tokenizer (docs/cross_tokenizer.md): TLI on the device, the same verifier at the edge
    "smollm2-qwen": (("smollm2-135m", "int8"), ("qwen2.5-coder-1.5b", "bf16")),
    "gemma3-qwen": (("gemma3-270m", "int8"), ("qwen2.5-coder-1.5b", "bf16")),
}


def parse_pairs(text: str) -> list[str]:
    """`qwen,smollm2-qwen`: the pairs one bench run measures in turn, each against its own `ar` baseline."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PAIRS]
    if bad or not names:
        raise ValueError(f"unknown pair {bad or text!r}; choose from {', '.join(PAIRS)}")
    return list(dict.fromkeys(names))
# policies: fixed gamma; a sweep of fixed gammas; gamma* from the fixed run's measurements; online adaptive;
# confidence stop; pipelined drafting at the fixed gamma; adaptive and pipelined together
BENCH_POLICIES = ("fixed", "sweep", "analytic", "adaptive", "confidence", "pipelined", "adaptive+pipelined")


@dataclass(frozen=True)
class Run:
    mode: str
    policy: str  # a BENCH_POLICIES name, "sweep" becoming "fixed-<gamma>"
    gamma: int
    spec_policy: str = "fixed"
    pipeline: bool = False


def parse_links(text: str) -> list[LinkProfile]:
    """`lan,5g,cell-edge` (profile names) or `;`-separated specs: `cell-edge;up=1M,down=5M,rtt=80ms`."""
    parts = text.split(";") if ";" in text else (text.split(",") if all(
        p.strip() in PROFILES for p in text.split(",")) else [text])
    return [parse_link(p) for p in parts if p.strip()]


def summarize(results: list[dict], wall_s: float) -> dict:
    """Totals of one run over the prompt set (stats as the draft service reports them)."""
    st = [r["stats"] for r in results]
    def total(key: str) -> float:
        return sum(s[key] for s in st)

    tokens, rounds, drafted, accepted = total("new_tokens"), total("rounds"), total("drafted"), total("accepted")
    rejections = total("rejections")
    spec_rounds = [s for s in st if s["drafted"]]
    return {
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "rounds": rounds,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "token_acceptance": accepted / (accepted + rejections) if accepted + rejections else 0.0,
        "mean_accepted_per_round": accepted / rounds if rounds else 0.0,
        "mean_gamma": (sum(s["mean_gamma"] * s["rounds"] for s in spec_rounds) / sum(s["rounds"] for s in spec_rounds)
                       if spec_rounds else 0.0),
        "uplink_bytes_per_token": total("uplink_bytes") / max(tokens, 1),
        "downlink_bytes_per_token": total("downlink_bytes") / max(tokens, 1),
        "uplink_bytes_per_drafted": total("uplink_bytes") / drafted if drafted else 0.0,
        "downlink_bytes_per_round": total("downlink_bytes") / rounds if rounds else 0.0,
        "draft_s_per_drafted": total("draft_s") / drafted if drafted else 0.0,
        "verify_s_per_round": total("verify_s") / rounds if rounds else 0.0,
        "prefetched": total("prefetched"),
    }


def costs(agg: dict, link: LinkProfile) -> tuple[float, float]:
    """(c, b) in seconds from a run's own measurements and its link: per draft token, per round."""
    c = agg["draft_s_per_drafted"] + link.up_seconds(agg["uplink_bytes_per_drafted"])
    b = agg["verify_s_per_round"] + link.rtt_s + link.down_seconds(agg["downlink_bytes_per_round"])
    return c, b


def predicted_speedup(agg: dict, link: LinkProfile, t_ar: float) -> float | None:
    """S from the run's alpha, mean gamma and costs, against the measured ar time per token on the link."""
    if not agg["drafted"] or t_ar <= 0:
        return None
    c, b = costs(agg, link)
    gamma = agg["mean_gamma"]
    return expected_tokens(agg["token_acceptance"], gamma) * t_ar / (c * gamma + b)


async def _run_prompts(nc, prompts, spec: SpecParams, n: int, tag: str, timeout: float) -> tuple[list[dict], float]:
    from draftwire.services.cli.remote import ask, request_body

    results = []
    t0 = time.perf_counter()
    for i, row in enumerate(prompts):
        sampling = SamplingParams(temperature=0.0, seed=i, max_new_tokens=n, min_new_tokens=n)
        rid = f"bench-{tag}-{i}-{time.time_ns()}"
        body = with_row(request_body("", sampling, spec, stream=False, rid=rid), row)
        result = await ask(nc, body, timeout)
        if "error" in result:
            raise RuntimeError(f"{tag}: {result['error']}")
        results.append(result)
    return results, time.perf_counter() - t0


def _runs_for(mode: str, policies: list[str], gamma: int, gammas: list[int]) -> list[Run]:
    runs = []
    for p in policies:
        if p == "fixed":
            runs.append(Run(mode, "fixed", gamma))
        elif p == "sweep":
            runs += [Run(mode, f"fixed-{g}", g) for g in gammas]
        elif p == "adaptive":
            runs.append(Run(mode, "adaptive", gamma, "adaptive"))
        elif p == "confidence":
            runs.append(Run(mode, "confidence", max(gammas + [gamma]), "confidence"))
        elif p == "pipelined":
            runs.append(Run(mode, "pipelined", gamma, pipeline=True))
        elif p == "adaptive+pipelined":
            runs.append(Run(mode, "adaptive+pipelined", gamma, "adaptive", True))
    return runs


async def bench_services(args, prompts, links: list[LinkProfile], modes: list[str], policies: list[str],
                         log) -> list[dict]:
    from draftwire.services.cli.stack import start_stack
    from draftwire.shared.io.bus import connect

    args.link = links[0]
    stack = await start_stack(args, quiet=not args.verbose)
    records: list[dict] = []
    n = args.max_new_tokens
    try:
        nc = await connect(stack.url, "draftwire-bench")
        try:
            warm = SpecParams(mode="tkslt", gamma=args.gamma, k=args.k)
            await _run_prompts(nc, prompts[:1], warm, 8, "warmup", args.timeout)
            for link in links:
                stack.link.profile = link
                log(f"\n== link {link.describe()}")
                ar_results, ar_wall = await _run_prompts(nc, prompts, SpecParams(mode="ar"), n, "ar", args.timeout)
                ar = summarize(ar_results, ar_wall)
                t_ar = ar_wall / max(ar["tokens"], 1)
                records.append(_record(args, "ar", "fixed", link, ar, ar["tokens_per_s"], None))
                log(_line(records[-1]))
                for mode in modes:
                    if mode == "ar":
                        continue
                    fixed_agg = None
                    for run in _runs_for(mode, policies, args.gamma, args.gammas):
                        if run.policy == "analytic":
                            continue
                        spec = SpecParams(mode=mode, gamma=run.gamma, k=args.k, policy=run.spec_policy,
                                          confidence=args.confidence, pipeline=run.pipeline)
                        res, wall = await _run_prompts(nc, prompts, spec, n, f"{mode}-{run.policy}", args.timeout)
                        agg = summarize(res, wall)
                        if run.spec_policy == "fixed" and not run.pipeline and run.gamma == args.gamma:
                            fixed_agg = agg  # the analytic policy's measurements (fixed or sweep at --gamma)
                        records.append(_record(args, mode, run.policy, link, agg, ar["tokens_per_s"],
                                               predicted_speedup(agg, link, t_ar), gamma=run.gamma))
                        log(_line(records[-1]))
                    if "analytic" in policies and fixed_agg is not None:
                        c, b = costs(fixed_agg, link)
                        g_star = optimal_gamma(fixed_agg["token_acceptance"], c, b, 16)
                        spec = SpecParams(mode=mode, gamma=g_star, k=args.k)
                        res, wall = await _run_prompts(nc, prompts, spec, n, f"{mode}-analytic", args.timeout)
                        agg = summarize(res, wall)
                        records.append(_record(args, mode, "analytic", link, agg, ar["tokens_per_s"],
                                               predicted_speedup(agg, link, t_ar), gamma=g_star))
                        log(_line(records[-1]))
        finally:
            await nc.close()
    finally:
        await stack.stop()
    return records


def _record(args, mode, policy, link: LinkProfile, agg: dict, ar_tps: float, predicted, gamma=None) -> dict:
    speed = agg["tokens_per_s"] / ar_tps if ar_tps else None
    return {
        "mode": mode,
        "policy": policy,
        "link": link.name,
        "link_up_bps": link.up_bps,
        "link_down_bps": link.down_bps,
        "link_rtt_s": link.rtt_s,
        "draft_model": f"{args.draft_model}:{args.draft_dtype}",
        "target_model": f"{args.target_model}:{args.target_dtype}",
        "gamma": gamma,
        "k": args.k if mode == "tkslt" else None,
        "tokens_per_s": agg["tokens_per_s"],
        "speedup_vs_ar": speed,
        "acceptance_rate": agg["acceptance_rate"],
        "token_acceptance": agg["token_acceptance"],
        "mean_accepted_per_round": agg["mean_accepted_per_round"],
        "uplink_bytes_per_token": agg["uplink_bytes_per_token"],
        "downlink_bytes_per_token": agg["downlink_bytes_per_token"],
        "mean_gamma": agg["mean_gamma"],
        "predicted_speedup": predicted,
        "measured_over_predicted": speed / predicted if speed and predicted else None,
        "prefetched_tokens": agg["prefetched"],
        "draft_s_per_drafted": agg["draft_s_per_drafted"],
        "verify_s_per_round": agg["verify_s_per_round"],
        "tokens": agg["tokens"],
        "wall_s": agg["wall_s"],
    }


def _line(r: dict) -> str:
    pred = f"{r['predicted_speedup']:.2f}" if r["predicted_speedup"] else "-"
    speed = f"{r['speedup_vs_ar']:.2f}" if r["speedup_vs_ar"] is not None else "-"
    return (f"{r['mode']:<6} {r['policy']:<19} {r['link']:<10} {r['tokens_per_s']:>7.2f} tok/s  speedup {speed:>5} "
            f"(pred {pred:>5})  acc {r['acceptance_rate']:.2f}  gamma {r['mean_gamma']:.2f}  "
            f"up {r['uplink_bytes_per_token']:>9.1f} B/tok  down {r['downlink_bytes_per_token']:>8.1f} B/tok")


def bench_hf_peer(args, prompts, log, with_ar: bool = True) -> list[dict]:
    """transformers' own assisted generation on the same pair and prompts, in one process (no link). A draft
    with another tokenizer runs as universal assisted generation (`tokenizer=`, `assistant_tokenizer=`)."""
    import torch

    from draftwire.shared.core.speculation import check_pair
    from draftwire.shared.models.runtime import load_model

    torch.set_num_threads(1)
    target = load_model(args.target_model, args.target_dtype, progress=False)
    draft = load_model(args.draft_model, args.draft_dtype, progress=False)
    cross = check_pair(draft, target) is not None
    assisted = {"assistant_model": draft.model}
    if cross:
        assisted |= {"tokenizer": target.tokenizer, "assistant_tokenizer": draft.tokenizer}
    runs = [("hf-ar", {})] if with_ar else []
    runs.append(("hf-uag" if cross else "hf-assisted", assisted))
    n = args.max_new_tokens
    out = []
    for label, kwargs in runs:
        tokens, t0 = 0, time.perf_counter()
        for row in prompts:
            ids = torch.tensor([prompt_ids(target, row)])
            with torch.inference_mode():
                gen = target.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            min_new_tokens=n, max_new_tokens=n,
                                            pad_token_id=target.eos_token_ids[0], **kwargs)
            tokens += gen.shape[1] - ids.shape[1]
        wall = time.perf_counter() - t0
        out.append({"mode": label, "policy": "hf", "link": "in-process",
                    "draft_model": f"{args.draft_model}:{args.draft_dtype}" if kwargs else None,
                    "target_model": f"{args.target_model}:{args.target_dtype}",
                    "tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall})
        log(f"{label:<12} in-process  {tokens / wall:>7.2f} tok/s")
    return out


def hf_speedups(records: list[dict]) -> None:
    """Each in-process record's speedup over transformers' own `ar` on the same target, measured in this run."""
    ar = {r["target_model"]: r["tokens_per_s"] for r in records if r["mode"] == "hf-ar"}
    for r in records:
        if r["link"] == "in-process" and r["target_model"] in ar:
            r["speedup_vs_ar"] = r["tokens_per_s"] / ar[r["target_model"]]


def plot(records: list[dict], out_dir: Path, gamma: int) -> list[str]:
    """Runs at the fixed gamma (or the sweep's run at it): speedup per uplink rate, and bytes per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    served = [r for r in records if r.get("link_up_bps") and r["mode"] != "ar"
              and r["policy"] in ("fixed", f"fixed-{gamma}")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drafts = {r["draft_model"] for r in served}
    for mode, draft in sorted({(r["mode"], r["draft_model"]) for r in served}):
        pts = sorted((r["link_up_bps"], r["speedup_vs_ar"]) for r in served
                     if r["mode"] == mode and r["draft_model"] == draft)
        label = f"{mode}, draft {draft}" if len(drafts) > 1 else mode
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("uplink rate (Mbit/s)")
    ax.set_ylabel("speedup over ar on the same link")
    ax.set_title("draftwire: speedup vs uplink rate (fixed gamma)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "speedup_vs_uplink.png", dpi=120)
    made.append("speedup_vs_uplink.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = [m for m in MODES if any(r["mode"] == m for r in served)]
    up = [_mean([r["uplink_bytes_per_token"] for r in served if r["mode"] == m]) for m in modes]
    down = [_mean([r["downlink_bytes_per_token"] for r in served if r["mode"] == m]) for m in modes]
    xs = range(len(modes))
    ax.bar([x - 0.2 for x in xs], up, width=0.4, label="uplink")
    ax.bar([x + 0.2 for x in xs], down, width=0.4, label="downlink")
    ax.set_xticks(list(xs), modes)
    ax.set_yscale("log")
    ax.set_ylabel("bytes per generated token")
    ax.set_title("draftwire: bytes per token per mode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bytes_per_token.png", dpi=120)
    made.append("bytes_per_token.png")
    plt.close(fig)
    return made


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def table(records: list[dict]) -> str:
    """The markdown table the README shows."""
    head = ("| link | mode | draft | policy | tok/s | speedup vs ar | predicted | ratio | acceptance | mean gamma "
            "| up B/tok | down B/tok |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in records:
        cells = [_cell(r, k, fmt) for k, fmt in (
            ("tokens_per_s", ".2f"), ("speedup_vs_ar", ".2f"), ("predicted_speedup", ".2f"),
            ("measured_over_predicted", ".2f"), ("acceptance_rate", ".2f"), ("mean_gamma", ".2f"),
            ("uplink_bytes_per_token", ".1f"), ("downlink_bytes_per_token", ".1f"))]
        draft = "-" if r["mode"] in ("ar", "hf-ar") else r.get("draft_model") or "-"
        rows.append(f"| {r['link']} | {r['mode']} | {draft} | {r['policy']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if r.get(key) is not None else "-"


def cmd_bench(args) -> int:
    from draftwire.services.cli.remote import load_prompts

    try:
        pairs = parse_pairs(args.pair) if args.pair else [None]
        links = parse_links(args.links)
    except (LinkError, ValueError) as exc:
        print(f"draftwire bench: error: {exc}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name, values, allowed in (("mode", modes, MODES), ("policy", policies, BENCH_POLICIES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            print(f"draftwire bench: error: unknown {name} {bad or values}; choose from {', '.join(allowed)}",
                  file=sys.stderr)
            return 2
    SpecParams(gamma=args.gamma, k=args.k)  # validate before starting anything
    for g in args.gammas:
        SpecParams(gamma=g)
    prompts = load_prompts(args.prompts, args.max_prompts)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    t0 = time.time()
    records: list[dict] = []
    hf_targets: set[str] = set()
    for pair in pairs:
        if pair is not None:
            (args.draft_model, args.draft_dtype), (args.target_model, args.target_dtype) = PAIRS[pair]
        log(f"draftwire bench: {args.draft_model}:{args.draft_dtype} -> {args.target_model}:{args.target_dtype}, "
            f"{len(prompts)} prompts x {args.max_new_tokens} tokens, links {[lk.name for lk in links]}, "
            f"modes {modes}, policies {policies}; device and edge get one torch thread each")
        records += asyncio.run(bench_services(args, prompts, links, modes, policies, log))
        if args.hf:
            target = f"{args.target_model}:{args.target_dtype}"
            records += bench_hf_peer(args, prompts, log, with_ar=target not in hf_targets)
            hf_targets.add(target)
    hf_speedups(records)
    meta = {
        "command": "draftwire " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "wall_s": time.time() - t0,
        "machine": f"{platform.machine()} {platform.processor() or ''} ".strip(),
        "pairs": [p for p in pairs if p is not None],
        "prompt_set": args.prompts,
        "prompts": [p.get("id", i) for i, p in enumerate(prompts)],
        "max_new_tokens": args.max_new_tokens,
        "torch_threads_per_service": 1,
        "links": {lk.name: lk.describe() for lk in links},
    }
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    (out_dir / "table.md").write_text(table(records))
    plots = plot(records, out_dir, args.gamma)
    log(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'table.md'} and {', '.join(plots)}")
    return 0
