"""Verifier (edge): holds the target model and one KV cache per session, answers verify requests.

Every instance serves `draftwire.verify.<instance>` and, in the `verifiers` queue group, `draftwire.verify`.
Devices find instances and their loads through micro stats (`$SRV.STATS.draftwire-verifier`; the scheduler
names the least-loaded one in each job), address one directly so its KV cache stays warm, and ping its micro
service while a round is in flight, so a dead instance is left at once (`services/draft/verifier_link.py`);
the queue group is the fallback when none is known. Every reply names this instance in the
`Draftwire-Instance` header. Whatever arrives is decoded by `draftwire.shared.core.speculation.decode_round` and
verified by `verify_rounds`, the functions the in-process engine calls too; a bad message gets an
`ErrorReply`, never an exception that could stop the service. Model work runs in one worker thread so the
event loop keeps answering pings and other sessions' messages while the target computes, and every round
that arrives meanwhile joins the NEXT forward pass (`Batcher`: continuous batching across sessions, bounded by
a token budget and a queue; beyond the queue, `busy`). A long prefill runs `--prefill-chunk` tokens per pass,
so the sessions already generating keep getting verdicts while a long prompt arrives, and a cancelled one
stops within a chunk (its `CloseSession` ends its round between two chunks).

Besides verifying, every instance answers `draftwire.verifier.info` (queue group `verifiers`) with the target's
identity (model, vocab size, EOS ids, context length: what the device needs to bound and stop a generation,
plus this instance's live `sessions` and `rounds` counts, and the digest of the target's vocabulary), and drops a session's KV cache as soon as its
`CloseSession` arrives on `draftwire.sessions.close` (every instance listens; whoever holds it frees it). A
close runs on the model thread like a verification, so it never races one.

Tokenizer exchange (docs/cross_tokenizer.md): at start the verifier stores its target's tokenizer bundle
(`vocab_bundle.pack`) in the JetStream object store `DRAFTWIRE_VOCAB` under the vocabulary digest, once per
digest, and names the digest in the info reply; a draft with another tokenizer fetches it by that digest.
Failing to store it (no permission, a full bucket) is logged, not fatal: same-tokenizer drafts need nothing.

Drain (docs/sessions.md, `draftwire.shared.core.drain`): a request on `draftwire.verifier.drain.<instance>`
makes the instance leave the `verifiers` queue group for rounds, report `draining` in its stats and info (so
nobody places a session here), serve the sessions it holds until they end or the drain's grace passes, and
answer every other round `draining` (with the `Draftwire-Draining` header), on which the device moves the
session to another verifier. Drained, it idles until resumed or stopped. SIGTERM drains with no grace (every
session moves at its next round, the rounds in flight are answered first) and stops once drained or after
`--drain-on-term` seconds; a second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from nats.micro import Request
from opentelemetry import trace

from draftwire.services.verifier.batcher import Batcher
from draftwire.shared.core.cross_vocab import model_vocabulary
from draftwire.shared.core.drain import (
    DRAINING,
    DRAINING_HEADER,
    DrainState,
    DrainStatus,
    verifier_drain_subject,
)
from draftwire.shared.core.protocol import (
    MAX_MESSAGE_BYTES,
    CloseSession,
    ErrorReply,
    ProtocolError,
    TargetInfo,
)
from draftwire.shared.core.speculation import decode_round, handle_close
from draftwire.shared.core.verifier_sessions import VerifierCore
from draftwire.shared.core.vocab_bundle import pack
from draftwire.shared.core.vocab_mapping import VocabularyError
from draftwire.shared.io import bus
from draftwire.shared.io.bus import INSTANCE_HEADER, SUBJECTS, VERIFY_QUEUE, extract_context
from draftwire.shared.io.micro_endpoints import drain_endpoint, leave, rejoin
from draftwire.shared.io.service_shell import (
    ServiceContext,
    add_model_flags,
    env_float,
    env_int,
    register,
    run,
    service_parser,
)
from draftwire.shared.models.batched_forward import PREFILL_CHUNK
from draftwire.shared.models.runtime import load_model

log = logging.getLogger("draftwire.verifier")


def build_parser():
    p = service_parser("verifier", __doc__.splitlines()[0])
    add_model_flags(p, "target", "fp32")
    p.add_argument("--max-sessions", type=int, default=env_int("MAX_SESSIONS", 64), help="[DRAFTWIRE_MAX_SESSIONS]")
    p.add_argument(
        "--max-cached-tokens", type=int, default=env_int("MAX_CACHED_TOKENS", 262_144),
        help="KV cache budget over all sessions, in tokens [DRAFTWIRE_MAX_CACHED_TOKENS]",
    )
    p.add_argument(
        "--verify-budget", type=int, default=env_int("VERIFY_BUDGET", 128),
        help="tokens per batched forward pass; beyond it the best draft prefixes are verified "
             "(TETRIS) [DRAFTWIRE_VERIFY_BUDGET]",
    )
    p.add_argument(
        "--batch-hold", type=float, default=env_float("BATCH_HOLD", 0.0),
        help="wait at most this fraction of a forward pass for sessions of the last passes still drafting "
             "(0: pure continuous batching) [DRAFTWIRE_BATCH_HOLD]",
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=env_int("PREFILL_CHUNK", PREFILL_CHUNK),
        help="most history tokens of one session's prefill per forward pass: other sessions' rounds share the "
             "passes in between, and a close or deadline stops the prefill within one chunk; 0: whole "
             "prefills in one pass [DRAFTWIRE_PREFILL_CHUNK]",
    )
    p.add_argument(
        "--max-queue", type=int, default=env_int("MAX_QUEUE", 256),
        help="rounds waiting for a forward pass; beyond it a round is refused `busy` [DRAFTWIRE_MAX_QUEUE]",
    )
    p.add_argument(
        "--drain-on-term", type=float, default=env_float("DRAIN_ON_TERM", 5.0),
        help="on SIGTERM, hand every session over to another verifier and stop once none is left, waiting at "
             "most this many seconds; 0: stop at once [DRAFTWIRE_DRAIN_ON_TERM]",
    )
    return p


async def start(ctx: ServiceContext) -> None:
    args = ctx.args
    if args.verify_budget < 1 or args.max_queue < 1 or not args.batch_hold >= 0 or args.prefill_chunk < 0:
        raise SystemExit("verifier: --verify-budget and --max-queue must be >= 1, --batch-hold and "
                         "--prefill-chunk >= 0")
    model = await asyncio.to_thread(load_model, args.target_model, args.target_dtype, False, args.target_device)
    core = VerifierCore(model, max_sessions=args.max_sessions, max_cached_tokens=args.max_cached_tokens,
                        prefill_chunk=args.prefill_chunk or None)
    digest = await publish_tokenizer(ctx, model)
    target = TargetInfo(model.name, model.vocab_size, tuple(model.eos_token_ids), model.context_length,
                        model.chat_template, digest)
    # memory is bounded: the weights, at most max_cached_tokens of KV (LRU eviction), one batch's temporaries
    kv_bound_mb = args.max_cached_tokens * core.kv_bytes_per_token() // (1 << 20)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
    ctx.cleanups.append(lambda: asyncio.to_thread(worker.shutdown, True))
    batcher = Batcher(core, worker, args.verify_budget, args.max_queue, hold=args.batch_hold)
    runner = asyncio.create_task(batcher.run(), name="verify-batches")

    def runner_ended(task: asyncio.Task) -> None:
        # without its batch loop the verifier would take rounds and never answer them: stop instead, so
        # devices see "no responders" and fail over, and a supervisor restarts this instance
        if not task.cancelled() and task.exception() is not None:
            log.critical("the batch loop died; stopping this verifier", exc_info=task.exception())
            ctx.stopping.set()

    runner.add_done_callback(runner_ended)

    async def stop_runner() -> None:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    ctx.cleanups.append(stop_runner)
    headers = {INSTANCE_HEADER: ctx.instance}
    moved = {**headers, DRAINING_HEADER: "1"}
    loop = asyncio.get_running_loop()
    rounds = 0

    in_flight: set[asyncio.Task] = set()
    drain = DrainState()
    left: list[dict] = []  # the queue-group endpoints a drain left, for a resume
    watcher: asyncio.Task | None = None
    terminating: asyncio.Task | None = None  # SIGTERM's drain

    async def handle(req: Request) -> None:
        """Return at once: micro awaits a handler before it delivers the subscription's next message, and the
        rounds that arrive while the model runs must all be waiting for the next forward pass."""
        task = asyncio.create_task(serve(req))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    async def serve(req: Request) -> None:
        nonlocal rounds
        rounds += 1
        with ctx.tracer.start_as_current_span(
            "verify", context=extract_context(req.headers), kind=trace.SpanKind.SERVER
        ) as span:
            span.set_attribute("draftwire.verifier_instance", ctx.instance)
            data = req.data
            moves = False  # refused by a drain: the reply tells the device to move the session
            if len(data) > MAX_MESSAGE_BYTES:
                reply = ErrorReply(code="oversize", message=f"{len(data)} bytes > {MAX_MESSAGE_BYTES}").encode()
            else:
                decoded = decode_round(data)
                if isinstance(decoded, bytes):
                    reply = decoded
                elif not drain.admits(decoded.session in core, time.monotonic()):
                    reply, moves = await refuse(decoded.session), True
                else:
                    reply = await batcher.submit(decoded)
            span.set_attribute("draftwire.downlink_bytes", len(reply))
            try:
                await req.respond(reply, headers=moved if moves else headers)
            except Exception as exc:  # noqa: BLE001 - a closed connection: the device times out and retries
                log.warning("could not send a verdict: %r", exc)

    async def refuse(session: str) -> bytes:
        """A draining verifier's answer to a round it does not serve: the device moves the session."""
        if session in core:
            await loop.run_in_executor(worker, core.close, session)  # on the model thread: never races a batch
        batcher.closed(session)
        return ErrorReply(code=DRAINING, session=session,
                          message=f"verifier {ctx.instance} is draining: the session moves").encode()

    def drain_status() -> DrainStatus:
        return DrainStatus(ctx.instance, drain.draining, core.sessions, len(in_flight),
                           drain.grace_left(time.monotonic()))

    async def watch_drain() -> None:
        """Drop whatever is still cached once the grace is over, and say when the drain is complete."""
        t0 = time.monotonic()
        while drain.draining:
            if drain.handing_over(time.monotonic()) and core.sessions:
                log.info("drain: the grace is over; %d session(s) move at their next round", core.sessions)
                await loop.run_in_executor(worker, core.close_all)
            if drain_status().drained:
                log.info("drained in %.1f s: no session held%s", time.monotonic() - t0,
                         "" if terminating else "; idle until resumed or stopped")
                return
            await asyncio.sleep(DRAIN_POLL_S)

    async def begin_drain(grace_s: float) -> None:
        nonlocal watcher
        first = not drain.draining
        drain.begin(time.monotonic(), grace_s)
        if first:
            left[:] = await leave(svc, {SUBJECTS.verify})  # no round reaches us through the queue group
            log.info("draining: %d session(s) held, grace %s s", core.sessions, grace_s)
        if watcher is None or watcher.done():
            watcher = asyncio.create_task(watch_drain(), name="drain")

    async def end_drain() -> None:
        if drain.draining:
            drain.resume()
            await rejoin(svc, left)
            left.clear()
            log.info("drain ended: taking new sessions again")

    handle_drain = drain_endpoint(begin_drain, end_drain, drain_status)

    async def drain_then_stop(bound_s: float) -> None:
        await begin_drain(0.0)
        give_up = time.monotonic() + bound_s
        while not drain_status().drained and time.monotonic() < give_up:
            await asyncio.sleep(DRAIN_POLL_S)
        status = drain_status()
        log.info("SIGTERM: %s; stopping", "drained" if status.drained else
                 f"{status.sessions} session(s) and {status.in_flight} round(s) left after {bound_s:g} s")
        ctx.stopping.set()

    def on_term() -> None:
        nonlocal terminating
        if terminating is not None:
            ctx.stopping.set()  # a second SIGTERM: at once
            return
        terminating = asyncio.create_task(drain_then_stop(args.drain_on_term), name="drain-then-stop")

    async def handle_info(req: Request) -> None:
        await req.respond(target.encode(
            instance=ctx.instance, sessions=core.sessions, rounds=rounds, forwards=core.forwards,
            batch_rows=core.batch_rows, forward_tokens=core.forward_tokens,
            prefill_chunks=core.prefill_chunks, busy=batcher.busy,
            queue=len(batcher.waiting), budget=batcher.budget,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,  # Linux: KiB
            cached_tokens=core.cached_tokens, kv_bound_mb=kv_bound_mb, draining=drain.draining,
        ))

    async def on_close(msg) -> None:
        with contextlib.suppress(ProtocolError):  # first: a prefill between two chunks ends before the next
            batcher.closed(CloseSession.decode(msg.data).session)
        if await loop.run_in_executor(worker, handle_close, core, msg.data) is not None:
            log.warning("ignored a malformed message on %s", SUBJECTS.sessions_close)

    svc = await register(
        ctx,
        "draftwire-verifier",
        "target model verification (edge)",
        [
            (SUBJECTS.verify, handle, VERIFY_QUEUE),
            (SUBJECTS.verify_instance(ctx.instance), handle, ctx.instance),
            (SUBJECTS.verifier_info, handle_info, VERIFY_QUEUE),
            (verifier_drain_subject(ctx.instance), handle_drain, ctx.instance),
        ],
        metadata={"model": args.target_model, "dtype": args.target_dtype},
        stats=lambda: {"sessions": core.sessions, "queue": len(batcher.waiting), "busy": batcher.busy,
                       "max_queue": batcher.max_queue,  # the scheduler and the drafts place sessions by it
                       **({"draining": True} if drain.draining else {})},
    )
    await ctx.nc.subscribe(SUBJECTS.sessions_close, cb=on_close)
    if args.drain_on_term > 0:
        loop.add_signal_handler(signal.SIGTERM, on_term)
    log.info("serving %s (%s) on %s and %s; batches of up to %d tokens, %d rounds queued at most, KV cache "
             "bounded at %d MiB", model.name, model.dtype, SUBJECTS.verify, SUBJECTS.verify_instance(ctx.instance),
             args.verify_budget, args.max_queue, kv_bound_mb)


PUBLISH_TIMEOUT_S = 30.0
DRAIN_POLL_S = 0.1


async def publish_tokenizer(ctx: ServiceContext, model) -> str:
    """Store the target's tokenizer bundle under its vocabulary digest (once per digest) and return the digest
    ("" for a model without a tokenizer that can be exchanged: then drafts are matched by size alone)."""
    try:
        vocabulary = await asyncio.to_thread(model_vocabulary, model)
        if vocabulary is None:
            return ""
        digest, data = await asyncio.to_thread(pack, model.tokenizer, model.vocab_size, vocabulary)
    except VocabularyError as exc:
        log.warning("the target's tokenizer cannot be exchanged (%s): only drafts with the same one will work", exc)
        return ""
    try:
        wrote = await asyncio.wait_for(bus.publish_vocabulary(ctx.nc.jetstream(), digest, data), PUBLISH_TIMEOUT_S)
        log.info("target vocabulary %s %s the %s object store (%d bytes)", digest[:12],
                 "stored in" if wrote else "already in", bus.VOCAB_BUCKET, len(data))
    except Exception as exc:  # noqa: BLE001 - drafts with another tokenizer then get `unknown_vocabulary`
        log.warning("could not store the target vocabulary %s in %s: %r", digest[:12], bus.VOCAB_BUCKET, exc)
    return digest


def main(argv: list[str] | None = None) -> None:
    run("verifier", build_parser(), start, argv)
