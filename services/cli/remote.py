"""Client side of the NATS contract: `draftwire generate` (without --local) and `draftwire demo`.

It speaks only the public contract (a JSON request on `draftwire.prompts`, the reply subject, the
`draftwire.stream.<id>` subject), so it doubles as the reference client for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid

from draftwire.shared.bench import BENCH_SET, label, load_set, with_row
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.io.bus import SUBJECTS, connect
from draftwire.shared.io.credentials import identity_name
from draftwire.shared.io.service_shell import connection_options

DEFAULT_URL = "nats://127.0.0.1:4222"


def request_body(prompt: str, sampling: SamplingParams, spec: SpecParams, stream: bool, rid: str) -> dict:
    return {
        "id": rid,
        "prompt": prompt,
        "max_new_tokens": sampling.max_new_tokens,
        "min_new_tokens": sampling.min_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "mode": spec.mode,
        "gamma": spec.gamma,
        "k": spec.k,
        "policy": spec.policy,
        "confidence": spec.confidence,
        "pipeline": spec.pipeline,
        "stream": stream,
    }


async def ask(nc, body: dict, timeout: float, on_text=None, tenant: str = "") -> dict:
    """Publish one request and return the final result; `on_text` gets streamed deltas as they arrive.

    With a `tenant` (a secured client) the request goes to that tenant's own subjects, the only ones its
    identity may use."""
    sub = None
    last_chunk = asyncio.Event()
    if on_text is not None:
        async def on_chunk(msg) -> None:
            chunk = json.loads(msg.data)
            if chunk.get("done"):
                last_chunk.set()
            else:
                on_text(chunk.get("text", ""))

        sub = await nc.subscribe(SUBJECTS.stream(body["id"], tenant), cb=on_chunk)
    body = {**body, "timeout_s": timeout}  # the work stops when the client stops waiting
    try:
        msg = await nc.request(SUBJECTS.prompts_for(tenant), json.dumps(body).encode(), timeout=timeout)
        result = json.loads(msg.data)
        if sub is not None and "error" not in result:  # a secured stack relays chunks: the last may trail
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(last_chunk.wait(), 1.0)
        return result
    except (asyncio.CancelledError, KeyboardInterrupt):  # Ctrl-C: stop the generation too, not only the wait
        with contextlib.suppress(Exception):
            await nc.publish(SUBJECTS.cancel(body["id"], tenant), b"")
            await nc.flush(timeout=1)
        raise
    finally:
        if sub is not None:
            await sub.unsubscribe()


async def _generate(args, sampling: SamplingParams, spec: SpecParams) -> int:
    tenant = identity_name(getattr(args, "creds", None))
    nc = await connect(args.nats or DEFAULT_URL, "draftwire-cli", **connection_options(args))
    try:
        body = request_body(args.prompt, sampling, spec, stream=not args.json, rid=uuid.uuid4().hex[:12])

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        result = await ask(nc, body, args.timeout, None if args.json else write, tenant)
    finally:
        await nc.close()
    if "error" in result:
        err = result["error"]
        print(f"draftwire: error: {err.get('code')}: {err.get('message')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        s = result["stats"]
        print(
            f"\n[{s.get('mode')}] {s.get('new_tokens')} tokens, {s.get('tokens_per_s', 0):.1f} tok/s, "
            f"acceptance {s.get('acceptance_rate', 0):.2f}, uplink {s.get('uplink_bytes_per_token', 0):.0f} B/token, "
            f"draft {s.get('draft_instance')} verifier {','.join(s.get('verifier_instances', []))}",
            file=sys.stderr,
        )
    return 0


def generate_remote(args, sampling: SamplingParams, spec: SpecParams) -> int:
    return asyncio.run(_generate(args, sampling, spec))


def load_prompts(path: str | None, n: int) -> list[dict]:
    """The first `n` rows of a prompt file (default: the in-repo bench set); a missing or bad file is an
    error, never a silent fallback."""
    return load_set(path or BENCH_SET)[:n]


async def _demo(args) -> int:
    from draftwire.services.cli.stack import start_stack

    prompts = load_prompts(args.prompts, args.num_prompts)
    print(f"draftwire demo: starting NATS and the services ({args.draft_model} {args.draft_dtype} -> "
          f"{args.target_model} {args.target_dtype}) ...", flush=True)
    stack = await start_stack(args, quiet=not args.verbose)
    rows = []
    try:
        nc = await connect(stack.url, "draftwire-demo", creds=stack.client_creds, tls=stack.client_tls())
        tenant = identity_name(stack.client_creds)
        try:
            for mode in args.modes.split(","):
                spec = SpecParams(mode=mode, gamma=args.gamma, k=args.k)
                totals = {"tokens": 0, "wall": 0.0, "drafted": 0, "accepted": 0, "up": 0, "down": 0}
                for i, row in enumerate(prompts):
                    sampling = SamplingParams(temperature=0.0, seed=i, max_new_tokens=args.max_new_tokens,
                                              min_new_tokens=args.max_new_tokens)
                    body = with_row(request_body("", sampling, spec, stream=True, rid=f"demo-{mode}-{i}"), row)
                    print(f"\n--- [{mode}] {label(row)!r}\n", end="", flush=True)
                    result = await ask(nc, body, 600, lambda t: print(t, end="", flush=True), tenant)
                    if "error" in result:
                        raise RuntimeError(f"{mode}: {result['error']}")
                    s = result["stats"]
                    totals["tokens"] += s["new_tokens"]
                    totals["wall"] += s["wall_s"]
                    totals["drafted"] += s["drafted"]
                    totals["accepted"] += s["accepted"]
                    totals["up"] += s["uplink_bytes"]
                    totals["down"] += s["downlink_bytes"]
                print()
                rows.append((mode, totals))
        finally:
            await nc.close()
    finally:
        await stack.stop()
    print(f"\n{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, through NATS on loopback")
    print(f"{'mode':<7} {'tokens/s':>9} {'acceptance':>11} {'uplink B/token':>15} {'downlink B/token':>17}")
    for mode, t in rows:
        acc = f"{t['accepted'] / t['drafted']:.2f}" if t["drafted"] else "-"
        n = max(t["tokens"], 1)
        print(f"{mode:<7} {t['tokens'] / t['wall']:>9.1f} {acc:>11} {t['up'] / n:>15.1f} {t['down'] / n:>17.1f}")
    return 0


def run_demo(args) -> int:
    return asyncio.run(_demo(args))
