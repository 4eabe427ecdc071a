"""`draftwire faults`: greedy prompts through the real services while one kind of service is killed repeatedly.

The acceptance test of the sessions design (docs/sessions.md), run as a benchmark rather than a unit test
because it takes minutes: a fault-free pass gives each prompt's reference output and latency, then one pass per
phase SIGKILLs a replica of that service every `--kill-every` seconds (alternating between replicas, each
restarted at once) while the same prompts run. It reports, per phase, how many prompts completed, failed,
came back identical to the fault-free pass and were answered more than once, and the latency each kill added:
for every kill, the largest (latency - fault-free latency) among the prompts in flight when it struck; the
table shows the median and the maximum over kills. Writes `DIR/results.json` and `DIR/latency.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack

from draftwire.services.cli.remote import load_prompts
from draftwire.shared.bench import DEFAULT_SET, PROMPTS_HELP, completions_only
from draftwire.shared.io.bus import SUBJECTS, connect
from draftwire.shared.io.service_shell import default_instance

SERVICE_OF_PHASE = {"verifier": "verifier", "draft": "draft", "scheduler": "scheduler"}
REPLY_GRACE_S = 3.0  # after a pass, how long to keep listening for a second (duplicate) reply


@dataclass
class Outcome:
    prompt: int
    started: float
    finished: float = 0.0
    replies: int = 0
    token_ids: list[int] | None = None
    error: str | None = None
    served_by: list[str] = field(default_factory=list)  # stack replica keys (verifier-2, draft, ...) that served it

    @property
    def latency(self) -> float:
        return self.finished - self.started


@dataclass
class Phase:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[tuple[float, str, list[int]]] = field(default_factory=list)  # (time, replica, prompts it served)
    restart_failures: int = 0
    skipped_kills: int = 0  # a kill was due while the previous replica was still restarting


async def _one(nc, i: int, prompt: str, args, tag: str, live: dict[str, Outcome]) -> Outcome:
    """Send one request on its own inbox so every reply, not only the first, is counted."""
    inbox = nc.new_inbox()
    out = Outcome(prompt=i, started=time.monotonic())
    first = asyncio.get_running_loop().create_future()

    async def on_reply(msg) -> None:
        out.replies += 1
        if not first.done():
            first.set_result(msg.data)

    sub = await nc.subscribe(inbox, cb=on_reply)
    live[f"{tag}-{i}"] = out
    body = {"id": f"{tag}-{i}", "prompt": prompt, "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.max_new_tokens, "temperature": 0.0, "seed": i, "timeout_s": args.timeout}
    await nc.publish(SUBJECTS.prompts, json.dumps(body).encode(), reply=inbox)
    try:
        data = await asyncio.wait_for(first, args.timeout + 30)
        out.finished = time.monotonic()
        result = json.loads(data)
        if "error" in result:
            out.error = f"{result['error'].get('code')}: {result['error'].get('message')}"
        else:
            out.token_ids = result["token_ids"]
    except TimeoutError:
        out.finished = time.monotonic()
        out.error = "no reply"
    live.pop(f"{tag}-{i}", None)
    out._sub = sub  # type: ignore[attr-defined]  # kept open to count late duplicates
    return out


def _key_of(stack, instance: str) -> str | None:
    """The stack replica key of a service instance (default instance names end in the process id)."""
    for key, proc in stack.procs.items():
        if instance.endswith(f"-{proc.pid}"):
            return key
    return None


async def _serving(nc, stack, service: str, live: dict[str, Outcome], rounds: dict[str, dict]) -> dict[str, str]:
    """request id -> replica key of `service` now serving it: drafts and verifiers from the latest round
    event of each request, schedulers from their own sessions listing."""
    out: dict[str, str] = {}
    if service == "scheduler":
        for key, proc in stack.procs.items():
            if key.split("-")[0] != "scheduler" or proc.returncode is not None:
                continue
            with contextlib.suppress(Exception):
                msg = await nc.request(f"draftwire.scheduler.sessions.{_instance(stack, key)}", b"", timeout=1)
                for row in json.loads(msg.data)["sessions"]:
                    out[row["id"]] = key
        return {rid: k for rid, k in out.items() if rid in live}
    field_name = "draft_instance" if service == "draft" else "verifier_instance"
    for rid in live:
        if (event := rounds.get(rid)) and (key := _key_of(stack, str(event.get(field_name, "")))):
            out[rid] = key
    return out


def _instance(stack, key: str) -> str:
    """The default instance name of replica `key` (`draftwire.shared.io.service_shell.default_instance`)."""
    return default_instance(key.split("-")[0], stack.procs[key].pid)


async def _pass(stack, prompts: list[dict], args, phase: Phase) -> None:
    nc = await connect(stack.url, f"draftwire-faults-{phase.name}")
    slots = asyncio.Semaphore(args.concurrency)
    stop_killing = asyncio.Event()
    restarts: list[asyncio.Task] = []
    live: dict[str, Outcome] = {}  # request id -> its outcome while in flight
    rounds: dict[str, dict] = {}  # request id -> its latest round event

    async def on_round(msg) -> None:
        with contextlib.suppress(Exception):
            event = msgpack.unpackb(msg.data, raw=False)
            rid = event["request_id"]
            rounds[rid] = event
            if (o := live.get(rid)) is not None:
                for name in ("draft_instance", "verifier_instance"):
                    key = _key_of(stack, str(event.get(name, "")))
                    if key and key not in o.served_by:
                        o.served_by.append(key)

    events = await nc.subscribe(SUBJECTS.events_round, cb=on_round)

    async def run(i: int, row: dict) -> Outcome:
        async with slots:
            return await _one(nc, i, row["prompt"], args, phase.name, live)

    async def killer(service: str) -> None:
        """Every `kill_every` s, SIGKILL the replica serving the oldest prompt in flight (else the next one in
        turn) and restart it; never while a restart is under way (killing a replica that is still loading, or
        the last one standing, would measure restart time rather than failover)."""
        keys = [k for k in stack.procs if k.split("-")[0] == service]
        n = 0
        while not stop_killing.is_set():
            try:
                await asyncio.wait_for(stop_killing.wait(), args.kill_every)
                return
            except TimeoutError:
                pass
            if any(not t.done() for t in restarts):
                phase.skipped_kills += 1
                continue
            serving = await _serving(nc, stack, service, live, rounds)
            for _ in range(10):  # a prompt that has not reported its first round yet: wait for it a little
                if serving or not live:
                    break
                await asyncio.sleep(0.1)
                serving = await _serving(nc, stack, service, live, rounds)
            oldest = sorted(serving, key=lambda rid: live[rid].started)
            key = serving[oldest[0]] if oldest else keys[n % len(keys)]
            n += 1
            struck = [live[rid].prompt for rid in oldest if serving[rid] == key]
            phase.kills.append((time.monotonic(), key, struck))
            restarts.append(asyncio.create_task(stack.restart(key)))

    kill_task = None
    if phase.name in SERVICE_OF_PHASE:
        kill_task = asyncio.create_task(killer(SERVICE_OF_PHASE[phase.name]))
    try:
        phase.outcomes = list(await asyncio.gather(*(run(i, row) for i, row in enumerate(prompts))))
    finally:
        stop_killing.set()
        if kill_task is not None:
            await kill_task
        results = await asyncio.gather(*restarts, return_exceptions=True)
        phase.restart_failures = sum(1 for r in results if r is not True)
        await asyncio.sleep(REPLY_GRACE_S)
        await events.unsubscribe()
        await nc.close()


def summarize(phase: Phase, reference: Phase | None) -> dict:
    """Counts and per-kill added latency of one pass; `reference` is the fault-free pass (None for itself).

    A kill's cost is the added latency (latency - fault-free latency) of the prompts in flight when it struck
    whose own instance it killed (the result names the instances that served it: a kill of the other replica
    costs nothing and is counted apart). A prompt hit by two kills is left out of the per-kill figures.
    """
    ref = {o.prompt: o for o in (reference or phase).outcomes}
    done = [o for o in phase.outcomes if o.error is None]
    identical = [o for o in done if o.token_ids == ref[o.prompt].token_ids]
    hits, idle = [], 0
    for t, _key, struck in phase.kills:
        once = [o for o in phase.outcomes if o.prompt in struck
                and sum(o.started <= t2 <= o.finished for t2, _, _ in phase.kills) == 1]
        if once:
            hits.append(max(o.latency - ref[o.prompt].latency for o in once))
        elif not struck:
            idle += 1
    lat = [o.latency for o in phase.outcomes]
    return {
        "phase": phase.name,
        "prompts": len(phase.outcomes),
        "completed": len(done),
        "failed": len(phase.outcomes) - len(done),
        "identical": len(identical),
        "duplicate_replies": sum(max(o.replies - 1, 0) for o in phase.outcomes),
        "kills": len(phase.kills),
        "kills_skipped_while_restarting": phase.skipped_kills,
        "kills_striking_one_prompt_once": len(hits),
        "kills_of_an_idle_replica": idle,
        "restart_failures": phase.restart_failures,
        "added_s_per_kill": hits,
        "median_added_s_per_kill": statistics.median(hits) if hits else None,
        "max_added_s_per_kill": max(hits) if hits else None,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_max_s": max(lat) if lat else None,
        "errors": sorted({o.error for o in phase.outcomes if o.error}),
    }


def _table(rows: list[dict]) -> str:
    head = ("| phase | prompts | completed | identical | duplicate replies | kills | median added s / kill "
            "| max added s / kill | p50 latency s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        med = "-" if r["median_added_s_per_kill"] is None else f"{r['median_added_s_per_kill']:.2f}"
        mx = "-" if r["max_added_s_per_kill"] is None else f"{r['max_added_s_per_kill']:.2f}"
        lines.append(f"| {r['phase']} | {r['prompts']} | {r['completed']} | {r['identical']} | "
                     f"{r['duplicate_replies']} | {r['kills']} | {med} | {mx} | {r['latency_p50_s']:.2f} |")
    return "\n".join(lines)


def _plot(phases: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    base = {o.prompt: o.latency for o in phases[0].outcomes}
    for ph in phases:
        xs = sorted(o.prompt for o in ph.outcomes)
        ax.plot(xs, [next(o.latency for o in ph.outcomes if o.prompt == x) - base[x] for x in xs], "o-",
                label=ph.name, markersize=3)
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("prompt")
    ax.set_ylabel("latency - fault-free latency (s)")
    ax.set_title("added latency per prompt, one kind of service killed every few seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def _faults(args) -> int:
    from draftwire.services.cli.stack import start_stack

    prompts = completions_only(load_prompts(args.prompts, args.num_prompts), "faults")
    phases_wanted = [p for p in args.phases.split(",") if p]
    for p in phases_wanted:
        if p not in SERVICE_OF_PHASE:
            raise SystemExit(f"draftwire faults: error: unknown phase {p!r}; use {', '.join(SERVICE_OF_PHASE)}")
    stack_args = argparse.Namespace(
        nats=None, nats_port=0, telemetry_port=0, draft_model=args.draft_model, draft_dtype=args.draft_dtype,
        target_model=args.target_model, target_dtype=args.target_dtype, mode=args.mode, gamma=args.gamma,
        k=args.k, verifiers=args.replicas, drafts=args.replicas, schedulers=args.replicas, torch_threads=1,
    )
    print(f"draftwire faults: {len(prompts)} prompts x {args.max_new_tokens} tokens, {args.replicas} replicas "
          f"of each service, phases: fault-free, {', '.join(phases_wanted)}", flush=True)
    stack = await start_stack(stack_args, quiet=not args.verbose)
    phases: list[Phase] = []
    try:
        for name in ["none", *phases_wanted]:
            phase = Phase(name)
            t0 = time.monotonic()
            await _pass(stack, prompts, args, phase)
            phases.append(phase)
            row = summarize(phase, phases[0])
            print(f"  {name}: {row['completed']}/{row['prompts']} completed, {row['identical']} identical, "
                  f"{row['duplicate_replies']} duplicate replies, {row['kills']} kills, "
                  f"median added {row['median_added_s_per_kill']} s ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        await stack.stop()
    rows = [summarize(p, phases[0]) for p in phases]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "phases": rows,
              "raw": [{"phase": p.name, "kills": p.kills,
                       "outcomes": [{k: v for k, v in asdict(o).items() if k != "token_ids"} for o in p.outcomes]}
                      for p in phases]}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    _plot(phases, out / "latency.png")
    print(_table(rows))
    print(f"wrote {out / 'results.json'} and {out / 'latency.png'}")
    bad = [r for r in rows if r["failed"] or r["identical"] != r["prompts"] or r["duplicate_replies"]]
    return 1 if bad else 0


def add_parser(sub, add_model_flags) -> None:
    p = sub.add_parser("faults", help="kill verifier, draft and scheduler replicas on a schedule under load")
    add_model_flags(p)
    p.add_argument("--prompts", default=DEFAULT_SET, help=PROMPTS_HELP)
    p.add_argument("--num-prompts", type=int, default=24, help="prompts per pass")
    p.add_argument("--max-new-tokens", type=int, default=32, help="exactly this many tokens each")
    p.add_argument("--phases", default="verifier,draft,scheduler", help="services to kill, one pass each")
    p.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    p.add_argument("--replicas", type=int, default=2, help="instances of each service")
    p.add_argument("--concurrency", type=int, default=1,
                   help="prompts in flight at once (1: each kill's cost is then that of one prompt)")
    p.add_argument("--timeout", type=float, default=300.0, help="each request's timeout_s")
    p.add_argument("--mode", default="tkslt", help="speculation mode")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round")
    p.add_argument("--k", type=int, default=8, help="top-K per draft position")
    p.add_argument("--out", default="bench-out/faults", help="output directory")
    p.add_argument("--verbose", action="store_true", help="show the services' logs")
    p.set_defaults(func=lambda a: asyncio.run(_faults(a)))
