"""`draftwire faults`: greedy prompts through the real services while faults strike on a schedule.

The acceptance test of the sessions design (docs/sessions.md) and the scale-out chaos suite
(docs/scale_out.md), run as a benchmark rather than a unit test because it takes minutes: a fault-free pass
gives each prompt's reference output and latency, then one pass per phase strikes every `--kill-every`
seconds while the same prompts run. A service phase SIGKILLs the replica serving the oldest prompt in flight
(each restarted at once); `nats` SIGKILLs a node of a local cluster (`--nats-cluster 3`) and restarts it on its
ports and store; `leaf` cuts the link of the device site's leaf server (`--leaf`) for `--outage` seconds;
`chaos` strikes each of those in turn (`--chaos-order`) in one pass. It reports, per pass, how many prompts
completed, failed, came back identical to the fault-free pass and were answered more than once, and the
latency each fault added: for every fault, the largest (latency - fault-free latency) among the prompts in
flight it could touch and no other fault did; the tables give the median and maximum, over all faults and per
kind of fault. Writes `DIR/results.json` and `DIR/latency.png`; exits 1 unless every prompt of every pass
completed, identical and answered once.
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

SERVICES = ("verifier", "draft", "scheduler")  # killed with SIGKILL and restarted
FAULTS = (*SERVICES, "nats", "leaf")  # nats: a cluster node SIGKILLed and restarted; leaf: the leaf link cut
PHASES = (*FAULTS, "chaos")  # chaos: every fault in turn (--chaos-order), in one pass
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

    async def strike(kind: str, n: int) -> None:
        """One fault of `kind`: pick what to hit, note the prompts in flight it can touch, start the recovery."""
        if kind == "nats":  # every prompt may be on the node (clients, streams and routes all are)
            i = n % stack.nats.size
            struck = [o.prompt for o in live.values()]
            phase.kills.append((time.monotonic(), f"nats-{i + 1}", struck))
            stack.nats.kill(i)
            restarts.append(asyncio.create_task(_recovered(stack.nats.restart(i))))
            return
        if kind == "leaf":  # every draft is behind it
            struck = [o.prompt for o in live.values()]
            phase.kills.append((time.monotonic(), "leaf", struck))
            stack.leaf_outage(args.outage)
            restarts.append(asyncio.create_task(_recovered(asyncio.sleep(args.outage))))
            return
        keys = [k for k in stack.procs if k.split("-")[0] == kind]
        serving = await _serving(nc, stack, kind, live, rounds)
        for _ in range(10):  # a prompt that has not reported its first round yet: wait for it a little
            if serving or not live:
                break
            await asyncio.sleep(0.1)
            serving = await _serving(nc, stack, kind, live, rounds)
        oldest = sorted(serving, key=lambda rid: live[rid].started)
        key = serving[oldest[0]] if oldest else keys[n % len(keys)]
        struck = [live[rid].prompt for rid in oldest if serving[rid] == key]
        phase.kills.append((time.monotonic(), key, struck))
        restarts.append(asyncio.create_task(stack.restart(key)))

    async def killer(kinds: list[str]) -> None:
        """Every `kill_every` s, the next fault of `kinds` in turn: a service's replica serving the oldest prompt
        in flight (else the next replica) SIGKILLed and restarted, a NATS node likewise, or the leaf link cut for
        `outage` s; never while the last fault is still being recovered from (that would measure restart time
        rather than failover, or strike the last replica standing)."""
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
            kind = kinds[n % len(kinds)]
            await strike(kind, n // len(kinds))  # the how-many-th fault of its kind
            n += 1

    kill_task = None
    if phase.name in PHASES:
        kill_task = asyncio.create_task(killer(args.chaos_order if phase.name == "chaos" else [phase.name]))
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


async def _recovered(recovery) -> bool:
    """A NATS node's restart or a link outage's end, as a replica's restart reports it (True: back)."""
    await recovery
    return True


def fault_kind(key: str) -> str:
    """`verifier-2` -> verifier, `nats-3` -> nats, `leaf` -> leaf."""
    return key.split("-")[0]


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
    by_kind: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for t, key, struck in phase.kills:
        counts[fault_kind(key)] = counts.get(fault_kind(key), 0) + 1
        once = [o for o in phase.outcomes if o.prompt in struck
                and sum(o.started <= t2 <= o.finished for t2, _, _ in phase.kills) == 1]
        if once:
            hits.append(max(o.latency - ref[o.prompt].latency for o in once))
            by_kind.setdefault(fault_kind(key), []).append(hits[-1])
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
        "by_fault": {kind: {"faults": counts[kind], "striking_one_prompt_once": len(by_kind.get(kind, [])),
                            "median_added_s": statistics.median(by_kind[kind]) if kind in by_kind else None,
                            "max_added_s": max(by_kind[kind]) if kind in by_kind else None}
                     for kind in counts},
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


def fault_table(rows: list[dict]) -> str:
    """The latency each kind of fault added (over every pass that had faults), one row per pass and kind."""
    lines = ["| pass | fault | faults | striking a prompt once | median added s | max added s |", "|" + "---|" * 6]
    for r in rows:
        for kind, f in r["by_fault"].items():
            med = "-" if f["median_added_s"] is None else f"{f['median_added_s']:.2f}"
            mx = "-" if f["max_added_s"] is None else f"{f['max_added_s']:.2f}"
            lines.append(f"| {r['phase']} | {kind} | {f['faults']} | {f['striking_one_prompt_once']} | {med} | {mx} |")
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

    phases_wanted = check_phases(args)
    rows = completions_only(load_prompts(args.prompts, args.num_prompts), "faults")
    prompts = [rows[i % len(rows)] for i in range(args.num_prompts)]  # the set again when it has fewer
    stack_args = argparse.Namespace(
        nats=None, nats_port=0, telemetry_port=0, draft_model=args.draft_model, draft_dtype=args.draft_dtype,
        target_model=args.target_model, target_dtype=args.target_dtype, mode=args.mode, gamma=args.gamma,
        k=args.k, verifiers=args.replicas, drafts=args.replicas, schedulers=args.replicas, torch_threads=1,
        nats_cluster=args.nats_cluster, leaf=args.leaf, link=args.link,
    )
    where = f"a {args.nats_cluster}-node NATS cluster" if args.nats_cluster else "one NATS server"
    print(f"draftwire faults: {len(prompts)} prompts ({len(rows)} distinct) x {args.max_new_tokens} tokens, "
          f"{args.replicas} replicas of each service on {where}{', drafts on a leaf node' if args.leaf else ''}; "
          f"passes: fault-free, {', '.join(phases_wanted)}", flush=True)
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
        cuts = sum(link.cuts for link in stack.leaf_links)  # connections the leaf outages really cut
        await stack.stop()
    rows = [summarize(p, phases[0]) for p in phases]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "phases": rows,
              "leaf_connections_cut": cuts,
              "raw": [{"phase": p.name, "kills": p.kills,
                       "outcomes": [{k: v for k, v in asdict(o).items() if k != "token_ids"} for o in p.outcomes]}
                      for p in phases]}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    _plot(phases, out / "latency.png")
    print(_table(rows))
    if any(r["by_fault"] for r in rows):
        print(fault_table(rows))
    print(f"wrote {out / 'results.json'} and {out / 'latency.png'}")
    bad = [r for r in rows if r["failed"] or r["identical"] != r["prompts"] or r["duplicate_replies"]]
    return 1 if bad else 0


def check_phases(args) -> list[str]:
    """The passes asked for, each checked against what the stack will have (a clear error, before any start)."""
    def fail(message: str):
        raise SystemExit(f"draftwire faults: error: {message}")

    wanted = [p for p in args.phases.split(",") if p]
    if unknown := [p for p in wanted if p not in PHASES]:
        fail(f"unknown phase {unknown[0]!r}; use {', '.join(PHASES)}")
    args.chaos_order = [k for k in args.chaos_order.split(",") if k]
    if bad := [k for k in args.chaos_order if k not in FAULTS]:
        fail(f"unknown fault {bad[0]!r} in --chaos-order; use {', '.join(FAULTS)}")
    kinds = set(wanted) | (set(args.chaos_order) if "chaos" in wanted else set())
    if "nats" in kinds and (args.nats_cluster or 0) < 3:
        fail("killing a NATS node needs --nats-cluster 3 (or more): with fewer, a node's loss stops JetStream")
    if "leaf" in kinds and not args.leaf:
        fail("a leaf link outage needs --leaf (the drafts on a device site's leaf server)")
    if args.num_prompts < 1 or args.replicas < 1 or args.kill_every <= 0 or args.outage <= 0:
        fail("--num-prompts and --replicas must be >= 1, --kill-every and --outage > 0")
    if "leaf" in kinds and args.outage >= args.timeout:
        fail("--outage must be shorter than each request's --timeout (a longer outage is meant to fail it)")
    return wanted


def add_parser(sub, add_model_flags) -> None:
    from draftwire.services.cli.main import _link

    p = sub.add_parser("faults", help="kill services and NATS nodes, cut the leaf link, on a schedule under load")
    add_model_flags(p)
    p.add_argument("--prompts", default=DEFAULT_SET, help=PROMPTS_HELP)
    p.add_argument("--num-prompts", type=int, default=24, help="prompts per pass")
    p.add_argument("--max-new-tokens", type=int, default=32, help="exactly this many tokens each")
    p.add_argument("--phases", default="verifier,draft,scheduler",
                   help=f"faults, one pass each ({', '.join(PHASES)}); chaos: every --chaos-order fault in turn")
    p.add_argument("--chaos-order", default="verifier,draft,scheduler,nats,leaf",
                   help="the faults the chaos pass strikes, in this order, round and round")
    p.add_argument("--nats-cluster", type=int, default=0, metavar="N",
                   help="run on a local cluster of N nats-servers (the nats fault needs 3)")
    p.add_argument("--leaf", action="store_true",
                   help="drafts on a device site's leaf server (the leaf fault cuts its link)")
    p.add_argument("--link", type=_link, default=None, help="shape the leaf link (a profile: lan, 5g, cell-edge)")
    p.add_argument("--outage", type=float, default=5.0, help="seconds each leaf link outage lasts")
    p.add_argument("--kill-every", type=float, default=10.0, help="seconds between faults")
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
