"""`draftwire loadtest`: N concurrent sessions through the real services, for N in `--sessions`.

What an edge serving many devices is judged by: aggregate tokens/s against the number of concurrent sessions,
each session's own tokens/s, time to first token and inter-token latency (from the arrival of streamed chunks
at the client), how many requests were refused, and what the verifier made of the load: target forwards run,
rows (sessions) per forward and tokens per forward, read from its `draftwire.verifier.info` counters before
and after each level (None from a verifier that does not count them). Every level starts from an idle stack
and sends its N requests at once (greedy, exactly `--max-new-tokens` each, prompts cycled from `--prompts`:
a completion as it is, a chat through the stack's chat template; `--replay` takes completions only).

`--check-identical` first serves every prompt the levels use alone, one at a time, and compares each level's
outputs with those: batching must not change a greedy output, except where float noise flips a near-tie, so
each mismatch comes with the target's logit gap (top-1 minus top-2) at the first differing position.

`--replay` measures the edge's capacity alone (see services/cli/replay.py): recorded real draft proposals sent
straight to one verifier for `--replay-seconds` per level; its figures are verified tokens/s, rounds/s and
round latency, labelled "replay (edge capacity)" wherever they are reported.

Both modes print a capacity ratio (each level's tokens/s over one session's) and write `DIR/results.json` and
`DIR/loadtest.png` (tokens/s and p99 latency against N).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from pathlib import Path

import msgpack

from draftwire.services.cli.remote import load_prompts
from draftwire.shared.bench import DEFAULT_SET, PROMPTS_HELP, completions_only, prompt_ids, with_row
from draftwire.shared.io.bus import SUBJECTS, connect

SERVICES_LABEL = "services (end to end)"
REPLAY_LABEL = "replay (edge capacity)"
VERIFIER_COUNTERS = ("forwards", "batch_rows", "forward_tokens", "busy")


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


def replay_summary(n: int, wall_s: float, tally) -> dict:
    """One replay level's figures from its `draftwire.shared.core.replay.ReplayTally`."""
    return {
        "sessions": n,
        "replayed_sessions": tally.sessions,
        "completed": tally.completed,
        "stopped": dict(tally.stopped),
        "divergences": list(tally.divergences),
        "busy": tally.busy,
        "rounds": tally.rounds,
        "verified_tokens": tally.tokens,
        "wall_s": wall_s,
        "verified_tokens_per_s": tally.tokens / wall_s if wall_s > 0 else 0.0,
        "rounds_per_s": tally.rounds / wall_s if wall_s > 0 else 0.0,
        "round_p50_s": percentile(tally.latencies, 50),
        "round_p99_s": percentile(tally.latencies, 99),
    }


def verifier_figures(before: dict | None, after: dict | None) -> dict:
    """What the verifier did during a level, from its info counters before and after: forwards, rows per
    forward (batch occupancy), tokens per forward, its `busy` refusals; its queue now and token budget. A
    figure is None where the verifier does not report the counter (an older verifier) or ran no forward."""
    def delta(key: str) -> int | None:
        a, b = (before or {}).get(key), (after or {}).get(key)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b < a:
            return None
        return int(b - a)

    forwards, rows, tokens = delta("forwards"), delta("batch_rows"), delta("forward_tokens")
    per_forward = (lambda x: None if x is None or not forwards else x / forwards)
    now = after or {}
    return {
        "verifier_forwards": forwards,
        "batch_occupancy": per_forward(rows),
        "tokens_per_forward": per_forward(tokens),
        "verifier_busy": delta("busy"),
        "verifier_queue": now.get("queue"),
        "verifier_budget": now.get("budget"),
        "verifier_peak_rss_mb": now.get("peak_rss_mb"),
    }


def alone_baseline(n: int, n_prompts: int, alone: dict[int, list[int]], alone_s: dict[int, float],
                   aggregate: float) -> dict:
    """The level's work served one request at a time: the tokens of the prompts it sends (prompt i % n_prompts
    for i < n) over their alone durations, and the level's aggregate tokens/s over that. A steadier baseline
    than one request: it averages over the very prompts the level runs."""
    used = [i % n_prompts for i in range(n)]
    if not used or any(i not in alone for i in used):
        return {"alone_tokens_per_s": None, "over_alone": None}
    rate = sum(len(alone[i]) for i in used) / sum(alone_s[i] for i in used)
    return {"alone_tokens_per_s": rate, "over_alone": aggregate / rate if rate else None}


def capacity_ratios(rows: list[dict], key: str) -> list[float | None]:
    """Each level's `key` (tokens/s) over the one-session level's, row by row: the one-session level run
    last before it (a repeated `1,16,1,16` pairs each 16 with the request just before it), else the first
    one-session level, else the first level."""
    if not rows:
        return []
    ones = [r for r in rows if r["sessions"] == 1]
    base = ones[0] if ones else rows[0]
    ratios = []
    for row in rows:
        if row["sessions"] == 1:
            base = row
        ratios.append(row[key] / base[key] if base[key] else None)
    return ratios


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (a length difference counts at the shorter's
    end); None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def find_mismatches(runs: list[dict], alone: dict[int, list[int]]) -> tuple[int, list[dict]]:
    """Compare every completed run ({id, prompt_index, token_ids, error}) with its prompt's output served
    alone; returns how many were compared and, per mismatch, the first differing position and tokens."""
    checked, out = 0, []
    for r in runs:
        ref = alone.get(r["prompt_index"])
        if r["error"] is not None or ref is None:
            continue
        checked += 1
        got = r["token_ids"]
        pos = first_difference(ref, got)
        if pos is not None:
            out.append({"id": r["id"], "prompt_index": r["prompt_index"], "position": pos,
                        "alone_token": ref[pos] if pos < len(ref) else None,
                        "got_token": got[pos] if pos < len(got) else None})
    return checked, out


def logit_gap(model, prompt_ids: list[int], prefix: list[int], tokens: tuple[int | None, ...] = (),
              min_new_tokens: int = 0) -> dict:
    """The target's next-token logits after `prompt_ids + prefix` (teacher-forced, one sequence alone): top-1
    minus top-2, and the logit of each of `tokens`. EOS is masked as the verifier masks it before
    `min_new_tokens`, so the gap is between choices the verifier could make."""
    import numpy as np

    from draftwire.shared.core.warpers import mask_eos

    logits = model.new_sequence().next_logits([*prompt_ids, *prefix], 1).numpy().astype(np.float64)
    logits = mask_eos(logits, model.eos_token_ids, len(prefix), min_new_tokens)[0]
    top2 = np.argsort(logits)[-2:][::-1]
    return {"top1": int(top2[0]), "top1_minus_top2": float(logits[top2[0]] - logits[top2[1]]),
            "logits": {str(t): float(logits[t]) for t in tokens if t is not None}}


async def read_verifier_info(nc) -> dict | None:
    """The verifier's info map (with one verifier, the queue group reaches it); None if it does not answer."""
    try:
        msg = await nc.request(SUBJECTS.verifier_info, b"", timeout=10)
        info = msgpack.unpackb(msg.data, raw=False)
    except Exception:  # noqa: BLE001 - a figure we cannot read is reported as None, not a failed benchmark
        return None
    return info if isinstance(info, dict) else None


async def _one(nc, rid: str, prompt_index: int, prompt: dict, args) -> dict:
    run = {"id": rid, "prompt_index": prompt_index, "tokens": 0, "token_ids": [], "started": time.monotonic(),
           "finished": 0.0, "chunks": [], "error": None}

    async def on_chunk(msg) -> None:
        chunk = json.loads(msg.data)
        if not chunk.get("done") and chunk.get("token_ids"):
            run["chunks"].append((time.monotonic(), len(chunk["token_ids"])))

    sub = await nc.subscribe(SUBJECTS.stream(rid), cb=on_chunk)
    body = with_row({"id": rid, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                     "temperature": 0.0, "seed": 0, "stream": True, "timeout_s": args.timeout}, prompt)
    try:
        msg = await nc.request(SUBJECTS.prompts, json.dumps(body).encode(), timeout=args.timeout + 30)
        result = json.loads(msg.data)
        if "error" in result:
            run["error"] = str(result["error"].get("code"))
        else:
            run["token_ids"] = list(result["token_ids"])
            run["tokens"] = len(run["token_ids"])
    except TimeoutError:
        run["error"] = "no_reply"
    finally:
        run["finished"] = time.monotonic()
        await sub.unsubscribe()
    return run


async def _services_levels(args, levels: list[int], prompts: list[dict]) -> tuple[list[dict], dict]:
    """The levels through the whole stack; with --check-identical also each used prompt served alone first."""
    from draftwire.services.cli.stack import start_stack

    stack_args = argparse.Namespace(
        nats=None, nats_port=0, telemetry_port=0, draft_model=args.draft_model, draft_dtype=args.draft_dtype,
        target_model=args.target_model, target_dtype=args.target_dtype, mode=args.mode, gamma=args.gamma,
        k=args.k, torch_threads=1, target_device=getattr(args, "target_device", None),
        draft_device=getattr(args, "draft_device", None), policy=args.policy, pipeline=args.pipeline,
    )
    stack = await start_stack(stack_args, quiet=not args.verbose)
    rows: list[dict] = []
    alone: dict[int, list[int]] = {}
    alone_s: dict[int, float] = {}
    try:
        nc = await connect(stack.url, "draftwire-loadtest")
        try:
            if args.check_identical:
                for i in range(min(max(levels), len(prompts))):
                    run = await _one(nc, f"alone-{i}", i, prompts[i], args)
                    if run["error"] is None:
                        alone[i] = run["token_ids"]
                        alone_s[i] = run["finished"] - run["started"]
                print(f"  served {len(alone)} prompts alone for --check-identical", flush=True)
            for n in levels:
                before = await read_verifier_info(nc)
                t0 = time.monotonic()
                runs = list(await asyncio.gather(*(
                    _one(nc, f"load-{n}-{i}", i % len(prompts), prompts[i % len(prompts)], args) for i in range(n)
                )))
                row = {**level_summary(n, time.monotonic() - t0, runs),
                       **verifier_figures(before, await read_verifier_info(nc))}
                if args.check_identical:
                    checked, mismatches = find_mismatches(runs, alone)
                    row["identical"] = {"checked": checked, "mismatches": len(mismatches), "details": mismatches}
                    row.update(alone_baseline(n, len(prompts), alone, alone_s, row["aggregate_tokens_per_s"]))
                rows.append(row)
                print(f"  {n:>3} sessions: {row['aggregate_tokens_per_s']:.1f} tokens/s aggregate, "
                      f"{row['completed']}/{n} completed, errors {row['errors']}"
                      + (f", {row['identical']['mismatches']} differ from alone, {row['over_alone']:.2f}x the same "
                         f"requests served one at a time" if args.check_identical and row.get("over_alone") else ""),
                      flush=True)
        finally:
            await nc.close()
    finally:
        await stack.stop()
    if any(row.get("identical", {}).get("details") for row in rows):
        await asyncio.to_thread(_add_logit_gaps, args, rows, prompts, alone)
    extra = {"alone_outputs": {str(i): ids for i, ids in alone.items()}} if args.check_identical else {}
    return rows, extra


def _add_logit_gaps(args, rows: list[dict], prompts: list[dict], alone: dict[int, list[int]]) -> None:
    """Each mismatch's logit gap, from the target loaded here (its tokenizer is the draft's family's)."""
    from draftwire.shared.models.runtime import load_model

    target = load_model(args.target_model, args.target_dtype, False, getattr(args, "target_device", "cpu"))
    for row in rows:
        for m in row["identical"]["details"]:
            ref = alone[m["prompt_index"]]
            m.update(logit_gap(target, prompt_ids(target, prompts[m["prompt_index"]]), ref[: m["position"]],
                               (m["alone_token"], m["got_token"]), args.max_new_tokens))


async def _replay_levels(args, levels: list[int], prompts: list[dict]) -> tuple[list[dict], dict]:
    from draftwire.services.cli import replay

    count = min(args.recordings or max(levels), len(prompts))
    t0 = time.monotonic()
    starting = asyncio.ensure_future(replay.start_edge(args, quiet=not args.verbose))  # starts while we record
    try:
        recordings = await replay.record(args, [row["prompt"] for row in prompts[:count]])
    except BaseException:
        starting.cancel()  # start_edge stops what it started when cancelled; if it had finished, stop it here
        started = (await asyncio.gather(starting, return_exceptions=True))[0]
        if not isinstance(started, BaseException):
            await started.stop()
        raise
    rounds = sum(len(r.rounds) for r in recordings)
    print(f"  recorded {count} sessions ({rounds} rounds) in {time.monotonic() - t0:.1f}s", flush=True)
    stack = await starting
    rows = []
    try:
        nc = await connect(stack.url, "draftwire-loadtest-replay")
        try:
            for n in levels:
                before = await read_verifier_info(nc)
                wall, tally = await replay.replay_level(nc, recordings, n, args.replay_seconds)
                row = {**replay_summary(n, wall, tally), **verifier_figures(before, await read_verifier_info(nc))}
                rows.append(row)
                print(f"  {n:>3} replayers: {row['verified_tokens_per_s']:.1f} verified tokens/s, "
                      f"{row['rounds']} rounds, busy {row['busy']}, stopped {row['stopped']}", flush=True)
        finally:
            await nc.close()
    finally:
        await stack.stop()
    recorded = {"recorded_sessions": count, "recorded_rounds": rounds,
                "recorded_tokens": sum(r.tokens for r in recordings)}
    return rows, recorded


async def _loadtest(args) -> int:
    try:
        levels = [int(x) for x in args.sessions.split(",") if x]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise SystemExit("draftwire loadtest: error: --sessions takes positive integers, e.g. 1,4,16")
    prompts = load_prompts(args.prompts, 1000)
    if args.replay:  # replay records in process from raw text
        prompts = completions_only(prompts, "loadtest --replay")
    label = REPLAY_LABEL if args.replay else SERVICES_LABEL
    print(f"draftwire loadtest: {label}", flush=True)
    if args.replay:
        rows, extra = await _replay_levels(args, levels, prompts)
        key = "verified_tokens_per_s"
    else:
        rows, extra = await _services_levels(args, levels, prompts)
        key = "aggregate_tokens_per_s"
    ratios = capacity_ratios(rows, key)
    for row, ratio in zip(rows, ratios, strict=True):
        row["capacity_ratio"] = ratio
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    results = {"mode": label, "settings": settings, "levels": rows, "capacity_ratio_of": key, **extra}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(rows, out / "loadtest.png", args.replay)
    print(_replay_table(rows) if args.replay else _table(rows))
    print(f"capacity ratio ({key} over 1 session's, {label}): "
          + ", ".join(f"{row['sessions']}: {_fmt(r, 2)}x" for row, r in zip(rows, ratios, strict=True)))
    print(f"wrote {out / 'results.json'} and {out / 'loadtest.png'}")
    return 0


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(rows: list[dict]) -> str:
    head = ("| sessions | completed | aggregate tok/s | session tok/s p50 | TTFT p50 s | TTFT p99 s | ITL p50 s "
            "| ITL p99 s | rows/forward | tokens/forward | busy (client/verifier) | differ from alone "
            "| x served one at a time | verifier peak RSS MB |")
    lines = [f"{SERVICES_LABEL}:", head, "|" + "---|" * 14]
    for r in rows:
        ident = r.get("identical")
        differ = "-" if ident is None else f"{ident['mismatches']}/{ident['checked']}"
        lines.append(f"| {r['sessions']} | {r['completed']} | {r['aggregate_tokens_per_s']:.1f} | "
                     f"{_fmt(r['session_tokens_per_s_p50'], 1)} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p99_s'])} "
                     f"| {_fmt(r['itl_p50_s'])} | {_fmt(r['itl_p99_s'])} | {_fmt(r['batch_occupancy'], 2)} | "
                     f"{_fmt(r['tokens_per_forward'], 1)} | {r['busy']}/{_opt(r['verifier_busy'])} | "
                     f"{differ} | {_fmt(r.get('over_alone'), 2)} | {_opt(r.get('verifier_peak_rss_mb'))} |")
    return "\n".join(lines)


def _replay_table(rows: list[dict]) -> str:
    head = ("| sessions | verified tok/s | rounds/s | round p50 s | round p99 s | rows/forward | tokens/forward "
            "| busy (replayers/verifier) | replayed sessions | stopped early |")
    lines = [f"{REPLAY_LABEL}:", head, "|" + "---|" * 10]
    for r in rows:
        stopped = ", ".join(f"{k} {v}" for k, v in sorted(r["stopped"].items())) or "0"
        lines.append(f"| {r['sessions']} | {r['verified_tokens_per_s']:.1f} | {r['rounds_per_s']:.1f} | "
                     f"{_fmt(r['round_p50_s'])} | {_fmt(r['round_p99_s'])} | {_fmt(r['batch_occupancy'], 2)} | "
                     f"{_fmt(r['tokens_per_forward'], 1)} | {r['busy']}/{_opt(r['verifier_busy'])} | "
                     f"{r['replayed_sessions']} | {stopped} |")
    return "\n".join(lines)


def _opt(v) -> str:
    return "-" if v is None else str(v)


def _plot(rows: list[dict], path: Path, replay: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["sessions"] for r in rows]
    if replay:
        tokens, p99 = "verified_tokens_per_s", "round_p99_s"
        labels = ("verified tokens/s", "p99 round latency (s)")
    else:
        tokens, p99 = "aggregate_tokens_per_s", "itl_p99_s"
        labels = ("aggregate tokens/s", "p99 inter-token latency (s)")
    ax.plot(xs, [r[tokens] for r in rows], "o-", label=labels[0])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r[p99] or 0 for r in rows], "s--", color="tab:red", label=labels[1].replace(" (s)", ""))
    ax2.set_ylabel(labels[1])
    ax.set_title(f"draftwire loadtest: {REPLAY_LABEL if replay else SERVICES_LABEL}")
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub, add_model_flags) -> None:
    p = sub.add_parser("loadtest", help="N concurrent sessions through the services: throughput and latency vs N")
    add_model_flags(p)
    p.add_argument("--sessions", default="1,4,16", help="concurrency levels, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=32, help="exactly this many tokens each")
    p.add_argument("--prompts", default=DEFAULT_SET, help=PROMPTS_HELP)
    p.add_argument("--timeout", type=float, default=600.0, help="each request's timeout_s")
    p.add_argument("--mode", default="tkslt", help="speculation mode")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round")
    p.add_argument("--k", type=int, default=8, help="top-K per draft position")
    p.add_argument("--policy", default="fixed", choices=("fixed", "adaptive", "confidence"),
                   help="draft-length policy")
    p.add_argument("--pipeline", action="store_true", help="pipelined (PEARL) drafting")
    p.add_argument("--check-identical", action="store_true",
                   help="serve each prompt alone first and compare every level's outputs with those")
    p.add_argument("--replay", action="store_true",
                   help="edge capacity alone: replay recorded draft proposals to one verifier (no --check-identical: "
                        "it compares every verdict with the recorded one instead)")
    p.add_argument("--replay-seconds", type=float, default=20.0, help="--replay: seconds per level")
    p.add_argument("--recordings", type=int, default=None,
                   help="--replay: sessions to record (default: the largest level's, at most the prompt count)")
    p.add_argument("--verifier-flags", default="",
                   help="--replay: extra flags for the verifier service, e.g. \"--max-sessions 128\"")
    p.add_argument("--out", default="bench-out/loadtest", help="output directory")
    p.add_argument("--verbose", action="store_true", help="show the services' logs")
    p.set_defaults(func=lambda a: asyncio.run(_loadtest(a)))
