"""`draftwire loadtest`: N concurrent sessions through the real services, for N in `--sessions`.

What an edge serving many devices is judged by: aggregate tokens/s against the number of concurrent sessions,
each session's own tokens/s, time to first token and inter-token latency (from the arrival of streamed chunks
at the client), and how many requests were refused. Every level starts from an idle stack and sends its N
requests at once (greedy, exactly `--max-new-tokens` each, prompts cycled from the bench set). Writes
`DIR/results.json` and `DIR/loadtest.png` (aggregate tokens/s and p99 inter-token latency against N).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from pathlib import Path

from services.cli.remote import load_prompts
from shared.io.bus import SUBJECTS, connect


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def level_summary(n: int, wall_s: float, runs: list[dict]) -> dict:
    """One concurrency level's figures from its runs ({tokens, started, chunks: [(t, n_tokens)], error})."""
    ok = [r for r in runs if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["chunks"][0][0] - r["started"] for r in ok if r["chunks"]]
    itl: list[float] = []
    for r in ok:  # a chunk of k tokens after a gap g counts as k tokens g/k apart
        for (t0, _), (t1, k) in zip(r["chunks"], r["chunks"][1:], strict=False):
            itl.extend([(t1 - t0) / k] * k)
    per_session = [r["tokens"] / (r["finished"] - r["started"]) for r in ok if r["finished"] > r["started"]]
    errors: dict[str, int] = {}
    for r in runs:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {
        "sessions": n,
        "completed": len(ok),
        "errors": errors,
        "busy": errors.get("busy", 0),
        "wall_s": wall_s,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "session_tokens_per_s_p50": statistics.median(per_session) if per_session else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }


async def _one(nc, rid: str, prompt: str, args) -> dict:
    run = {"tokens": 0, "started": time.monotonic(), "finished": 0.0, "chunks": [], "error": None}

    async def on_chunk(msg) -> None:
        chunk = json.loads(msg.data)
        if not chunk.get("done") and chunk.get("token_ids"):
            run["chunks"].append((time.monotonic(), len(chunk["token_ids"])))

    sub = await nc.subscribe(SUBJECTS.stream(rid), cb=on_chunk)
    body = {"id": rid, "prompt": prompt, "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.max_new_tokens, "temperature": 0.0, "seed": 0, "stream": True,
            "timeout_s": args.timeout}
    try:
        msg = await nc.request(SUBJECTS.prompts, json.dumps(body).encode(), timeout=args.timeout + 30)
        result = json.loads(msg.data)
        if "error" in result:
            run["error"] = str(result["error"].get("code"))
        else:
            run["tokens"] = len(result["token_ids"])
    except TimeoutError:
        run["error"] = "no_reply"
    finally:
        run["finished"] = time.monotonic()
        await sub.unsubscribe()
    return run


async def _loadtest(args) -> int:
    from services.cli.stack import start_stack

    levels = [int(x) for x in args.sessions.split(",") if x]
    if not levels or min(levels) < 1:
        raise SystemExit("draftwire loadtest: error: --sessions takes positive integers, e.g. 1,4,16")
    prompts = load_prompts(args.prompts, 1000)
    stack_args = argparse.Namespace(
        nats=None, nats_port=0, telemetry_port=0, draft_model=args.draft_model, draft_dtype=args.draft_dtype,
        target_model=args.target_model, target_dtype=args.target_dtype, mode=args.mode, gamma=args.gamma,
        k=args.k, torch_threads=1,
    )
    stack = await start_stack(stack_args, quiet=not args.verbose)
    rows = []
    try:
        nc = await connect(stack.url, "draftwire-loadtest")
        try:
            for n in levels:
                t0 = time.monotonic()
                runs = await asyncio.gather(*(
                    _one(nc, f"load-{n}-{i}", prompts[i % len(prompts)]["prompt"], args) for i in range(n)
                ))
                row = level_summary(n, time.monotonic() - t0, list(runs))
                rows.append(row)
                print(f"  {n:>3} sessions: {row['aggregate_tokens_per_s']:.1f} tokens/s aggregate, "
                      f"{row['completed']}/{n} completed, errors {row['errors']}", flush=True)
        finally:
            await nc.close()
    finally:
        await stack.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    (out / "results.json").write_text(json.dumps({"settings": settings, "levels": rows}, indent=1))
    _plot(rows, out / "loadtest.png")
    print(_table(rows))
    print(f"wrote {out / 'results.json'} and {out / 'loadtest.png'}")
    return 0


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(rows: list[dict]) -> str:
    head = ("| sessions | completed | aggregate tok/s | session tok/s p50 | TTFT p50 s | TTFT p99 s | ITL p50 s "
            "| ITL p99 s | busy |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['sessions']} | {r['completed']} | {r['aggregate_tokens_per_s']:.1f} | "
                     f"{_fmt(r['session_tokens_per_s_p50'], 1)} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p99_s'])} "
                     f"| {_fmt(r['itl_p50_s'])} | {_fmt(r['itl_p99_s'])} | {r['busy']} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["sessions"] for r in rows]
    ax.plot(xs, [r["aggregate_tokens_per_s"] for r in rows], "o-", label="aggregate tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["itl_p99_s"] or 0 for r in rows], "s--", color="tab:red", label="p99 inter-token latency")
    ax2.set_ylabel("p99 inter-token latency (s)")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub, add_model_flags) -> None:
    p = sub.add_parser("loadtest", help="N concurrent sessions through the services: throughput and latency vs N")
    add_model_flags(p)
    p.add_argument("--sessions", default="1,4,16", help="concurrency levels, comma-separated (default 1,4,16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="exactly this many tokens each (default 32)")
    p.add_argument("--prompts", default=None, help="a JSONL file of {\"prompt\": ...} rows (default: the bench set)")
    p.add_argument("--timeout", type=float, default=600.0, help="each request's timeout_s (default 600)")
    p.add_argument("--mode", default="tkslt", help="speculation mode (default tkslt)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round (default 4)")
    p.add_argument("--k", type=int, default=8, help="top-K per draft position (default 8)")
    p.add_argument("--out", default="bench-out/loadtest", help="output directory (default bench-out/loadtest)")
    p.add_argument("--verbose", action="store_true", help="show the services' logs")
    p.set_defaults(func=lambda a: asyncio.run(_loadtest(a)))
