"""Draft (device): runs `draftwire.shared.core.speculation.speculate` for each job, over a NATS link to the verifiers.

Lifecycle of a job (docs/sessions.md). The scheduler requests `draftwire.draft.start` (queue group `drafts`)
and is answered at once: `{"accepted": true, "instance": ...}`, or an error for a bad job, a deadline already
passed, or a prompt that does not fit the context (prompt tokens + `max_new_tokens` above the draft's or the
target's context length: checked before any model work). A start for a session this instance already runs is
answered `accepted` again and starts nothing. While a session runs, this instance answers
`draftwire.draft.session.<session>` with `{"instance", "round"}` (liveness for the scheduler) and listens on
`draftwire.cancel.<id>`; a cancel, or the job's deadline passing, stops it within one round with the error
`cancelled` / `deadline_exceeded` and the partial text. The final body is stored with `js.publish` on
`draftwire.done.<session>` (stream DRAFTWIRE_DONE) and only then does the instance stop answering the session
subject, so a scheduler always finds either the runner or the result. Every end (done, failed, cancelled)
publishes `CloseSession` on `draftwire.sessions.close`, so the verifier frees the KV cache at once.

Stopping uses the TARGET's EOS ids, learnt from `draftwire.verifier.info` (losslessness is with respect to the
target). Accepted text is streamed on `draftwire.stream.<id>` with `offset` (tokens before the chunk), and every
round and request is published as a telemetry event. The link to the edge is `verifier_link.NatsEdge`.

A target with another tokenizer (its info names a vocabulary digest that is not the draft's): the job's
prompt is encoded and its output decoded with the target's tokenizer, fetched by digest from the
`DRAFTWIRE_VOCAB` object store and drafted through the TLI mapping (`target_vocab.py`,
docs/cross_tokenizer.md); the opening request states both digests and the result's stats name them. Equal
digests keep today's path and cost. The start reply's context check then counts the draft's tokens; the run
checks again in the target's.

Fair share and batching: at most `--max-concurrent` generations run at once (later ones wait for a slot, first
come first served, still answering session pings and cancels). Each drafts on its own thread (a pool of
`--max-concurrent`), and every draft step goes to ONE model thread (`draftwire.shared.models.forward_batcher`), which
runs the steps of every generation that is drafting as one batched forward pass, one per generation (it waits
for a drafting generation still sampling its last token, never on a timer): N generations drafting together
advance a token each per pass, none can hold the model for more than one step, and their rounds reach the
verifier together, where they batch again. Only the model thread computes (`--torch-threads` is its
intra-op pool); the drafting threads sample and wait. Nothing slow runs on the event loop (tokenizing goes to a
thread), so pings, cancels and session pings are answered during any generation.

Drain (`draftwire.shared.core.drain`): a request on `<prefix>.drain.<instance>` makes the instance leave both
start subjects (the scheduler then places jobs elsewhere, and one sent here anyway finds "no responders") and
report `draining` in its stats; the generations it runs finish here, then it idles until resumed or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgpack
import nats.errors
import nats.js.errors
from nats.micro import Request
from opentelemetry import trace

from draftwire.services.draft.target_vocab import Pairing, TargetVocabs, VocabUnavailable
from draftwire.services.draft.verifier_link import NatsEdge, VerifierDirectory
from draftwire.shared.core.backoff import Backoff
from draftwire.shared.core.draft_length_policy import AdaptiveGamma, WarmStarts, make_policy
from draftwire.shared.core.draft_session import DraftSession
from draftwire.shared.core.drain import (
    DrainState,
    DrainStatus,
    draft_drain_subject,
)
from draftwire.shared.core.params import ParamError
from draftwire.shared.core.prompt_request import GenerateJob, RequestError, encode_reply, error_body
from draftwire.shared.core.protocol import CloseSession, TargetInfo
from draftwire.shared.core.race import unless
from draftwire.shared.core.rejection_sampling import NonFinite
from draftwire.shared.core.round_stats import RoundStats
from draftwire.shared.core.speculation import RemoteError, new_session, speculate
from draftwire.shared.core.stop_strings import find_stop, streamable
from draftwire.shared.core.telemetry_figures import TokenClock
from draftwire.shared.io import bus
from draftwire.shared.io.bus import SUBJECTS, extract_context
from draftwire.shared.io.credentials import identity_name
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
from draftwire.shared.models.forward_batcher import BatchedModel, ForwardBatcher
from draftwire.shared.models.runtime import LoadedModel, load_model

log = logging.getLogger("draftwire.draft")

STOP_CODES = ("cancelled", "deadline_exceeded")
INFO_QUICK_S = 0.5  # how long the start reply may wait for the target's info; later the run itself waits
DONE_MARGIN_S = 30.0  # the final body is retried this long past the deadline (or the end, without one)
NO_DEADLINE_WAIT_S = 120.0  # without a deadline, how long a job may wait for a verifier to describe the target


def build_parser():
    p = service_parser("draft", __doc__.splitlines()[0])
    add_model_flags(p, "draft", "int8")
    p.add_argument(
        "--max-concurrent", type=int, default=env_int("MAX_CONCURRENT", 16),
        help="generations run at once; more wait for a slot [DRAFTWIRE_MAX_CONCURRENT]",
    )
    p.add_argument(
        "--verify-timeout", type=float, default=env_float("VERIFY_TIMEOUT", 15.0),
        help="seconds to wait for one verify reply from a verifier that still answers pings (a dead one is "
        "noticed within a second) [DRAFTWIRE_VERIFY_TIMEOUT]",
    )
    p.add_argument(
        "--verifier-wait", type=float, default=env_float("VERIFIER_WAIT", 120.0),
        help="seconds a round may wait for any verifier to appear [DRAFTWIRE_VERIFIER_WAIT]",
    )
    return p


class TextStream:
    """Turns committed token ids into text deltas, holding back an incomplete UTF-8 character and any tail
    that may grow into a stop string; nothing from a stop string on is ever sent."""

    def __init__(self, decode, stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = tuple(stops)
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, new: list[int]) -> str:
        self.tokens.extend(new)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        if self.stops:
            at = find_stop(text, self.stops)
            text = text[:at] if at is not None else text[: streamable(text, self.stops)]
        if len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


class Stopped(Exception):
    """A cancel or the deadline ended the run; `code` is `cancelled` or `deadline_exceeded`."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Run:
    """One accepted job on this instance, from the start reply to its stored result."""

    job: GenerateJob
    prompt_ids: list[int]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    session: DraftSession | None = None
    task: asyncio.Task | None = None
    subs: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)  # accepted here: time to first token counts from it
    pairing: Pairing | None = None  # how it talks to its target (None until known: the draft's tokenizer)

    @property
    def round(self) -> int:
        return self.session.round if self.session is not None else 0

    def stop_reason(self) -> str | None:
        """What `speculate` checks before every round."""
        if self.cancelled.is_set():
            return "cancelled"
        if self.job.deadline and time.time() > self.job.deadline:
            return "deadline_exceeded"
        return None

    async def until_stopped(self) -> str:
        """Return the reason once the run is cancelled or its deadline passes."""
        if not self.job.deadline:
            await self.cancelled.wait()
            return "cancelled"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.cancelled.wait(), max(0.0, self.job.deadline - time.time()))
        return self.stop_reason() or "deadline_exceeded"

    async def unless_stopped(self, coro):
        """Await `coro`, abandoning it (Stopped) as soon as a cancel arrives or the deadline passes."""
        finished, value = await unless(coro, self.until_stopped())
        if finished:
            return value
        raise Stopped(value)


def context_error(n_prompt: int, max_new: int, draft: LoadedModel | None, target: TargetInfo | None) -> str | None:
    """The message of a `context_length_exceeded` error, or None when the job fits both models."""
    limits = []
    if draft is not None:
        limits.append((draft.context_length, f"draft {draft.name}"))
    if target is not None:
        limits.append((target.context_length, f"target {target.model}"))
    if not limits:
        return None
    limit, who = min(limits)
    if n_prompt + max_new <= limit:
        return None
    return (f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new}) = {n_prompt + max_new} exceeds the "
            f"context length {limit} of the {who}")


async def start(ctx: ServiceContext) -> None:
    args = ctx.args
    if args.max_concurrent < 1:
        raise SystemExit("draftwire-draft: error: --max-concurrent must be >= 1")
    model = await asyncio.to_thread(load_model, args.draft_model, args.draft_dtype, False, args.draft_device)
    batcher = ForwardBatcher("draft-model")  # the one thread that runs the model, for every session at once
    drafting = BatchedModel(model, batcher)
    workers = ThreadPoolExecutor(max_workers=args.max_concurrent, thread_name_prefix="draft")
    slots = asyncio.Semaphore(args.max_concurrent)
    runs: dict[str, Run] = {}  # session -> run
    directory = VerifierDirectory(ctx.nc)
    js = ctx.nc.jetstream()
    await _done_stream_ready(js)
    vocabs = TargetVocabs(js, model)
    await vocabs.load_own()
    warm = WarmStarts()  # adaptive draft length: per (mode, K) and load, across sessions
    loop = asyncio.get_running_loop()

    # Secured (a device identity): jobs, pings and cancels arrive under the identity's own prefix, and stream
    # chunks leave under it for the scheduler to relay; no other device can read or forge them.
    device = identity_name(args.creds) or None
    prefix = SUBJECTS.device_prefix(device)

    def stream_subject(job: GenerateJob) -> str:
        return SUBJECTS.draft_chunks(job.session, prefix) if device else SUBJECTS.stream(job.id, job.tenant)

    def drafter(job: GenerateJob) -> LoadedModel | None:
        """The draft model, when the job's mode uses one (its context then bounds the job too)."""
        return model if job.spec.mode != "ar" else None

    def batched(fn):
        with batcher.drafting():  # its next step is coming: the model thread waits for it (no timer)
            return fn()

    async def compute(fn):
        return await loop.run_in_executor(workers, batched, fn)

    async def publish(subject: str, body: dict, fmt: str = "msgpack") -> None:
        try:
            await ctx.nc.publish(subject, encode_reply(body, fmt))
        except Exception:  # telemetry and streams are best effort; the stored result is what matters
            log.debug("publish to %s failed", subject, exc_info=True)

    def decode_of(run: Run):
        return run.pairing.decoder(model) if run.pairing is not None else model.decode

    async def generate(run: Run, target: TargetInfo, link: NatsEdge) -> dict:
        job = run.job
        pairing = run.pairing
        run.session = session = new_session(  # the request's stop token ids end it like an EOS
            drafting, model, (*target.eos_token_ids, *job.stop_token_ids), target.vocab_size, run.prompt_ids,
            job.params, job.spec, job.session, job.deadline, job.resume, cross=pairing.cross,
        )
        decode = decode_of(run)
        text = TextStream(decode, job.stop)
        text.push(list(job.resume))  # already streamed by the run that died: deltas continue after it

        clock = TokenClock(run.started, resumed=bool(job.resume))
        loads: list[int] = []  # sessions on this instance at each round: the load its costs were learnt under

        async def on_round(rs: RoundStats, new: list[int]) -> None:
            loads.append(len(runs))
            event = {"type": "round", "request_id": job.id, "mode": job.spec.mode, "gamma": rs.drafted,
                     "draft_instance": ctx.instance, "verifier_instance": link.instance or "",
                     **rs.to_dict(), "ts": time.time(), **clock.lap(time.perf_counter(), rs.emitted)}
            await publish(SUBJECTS.events_round, event)
            if job.stream:
                chunk = {"id": job.id, "text": text.push(new), "token_ids": new,
                         "offset": len(session.generated) - len(new), "done": False}
                await publish(stream_subject(job), chunk, job.format)

        key = (job.spec.mode, job.spec.k)
        policy = make_policy(job.spec.policy, job.spec.gamma, warm.get(key, len(runs)))
        result = await run.unless_stopped(speculate(
            session, link, decode=decode, compute=compute, on_round=on_round, tracer=ctx.tracer,
            policy=policy, should_stop=run.stop_reason, stop=job.stop,
            open_early=True,  # the draft's prefill hides behind the target's (drafting runs off the loop here)
        ))
        if isinstance(policy, AdaptiveGamma):  # the next session on this device starts from what this one learnt
            warm.put(key, loads, policy.model)
        body = {"id": job.id, **{k: v for k, v in result.to_dict().items() if k != "rounds"}}
        if pairing.target is not None:  # the session states both tokenizers' identities
            body["stats"].update(draft_vocab=pairing.draft_digest, target_vocab=pairing.target_digest)
        if result.finish_reason in STOP_CODES:
            body["error"] = error_body(result.finish_reason, _stop_message(result.finish_reason))["error"]
        return body

    def partial(run: Run, code: str, message: str) -> dict:
        """An error body with whatever the session had committed when it ended."""
        body = error_body(code, message, run.job.id)
        if run.session is not None or code in STOP_CODES:
            ids = run.session.generated if run.session is not None else []
            body.update(text=decode_of(run)(ids), token_ids=ids, stats={"new_tokens": len(ids), "rounds": run.round})
        return body

    async def execute(run: Run, link: NatsEdge) -> dict:
        job = run.job
        try:
            target = directory.cached_target()
            if target is None:  # no verifier described the target at start: wait for one
                give_up = job.deadline or time.time() + min(args.verifier_wait, NO_DEADLINE_WAIT_S)
                target = await run.unless_stopped(directory.target(give_up))
            run.pairing = await run.unless_stopped(vocabs.pairing(target, drafter(job) is not None))
            if run.pairing.target is not None:  # the session's ids are the target's: tokenize with its tokenizer
                run.prompt_ids = await asyncio.to_thread(prompt_ids_of, job, run.pairing, target)
                if not run.prompt_ids:
                    return error_body("bad_request", "the prompt is empty after tokenization", job.id)
            # again here: the start reply may have been sent before the target's limit was known
            if message := context_error(len(run.prompt_ids), job.params.max_new_tokens, drafter(job), target):
                return error_body("context_length_exceeded", message, job.id)
            await run.unless_stopped(slots.acquire())
            try:
                return await generate(run, target, link)
            finally:
                slots.release()
        except Stopped as exc:
            return partial(run, exc.code, _stop_message(exc.code))
        except RemoteError as exc:
            if exc.code not in STOP_CODES:  # the edge refused: what we know of it may be stale
                directory.drop_target()
            return partial(run, exc.code, exc.message)
        except VocabUnavailable as exc:  # the edge's vocabulary is not to be had: ask it again next time
            directory.drop_target()
            return partial(run, exc.code, exc.message)
        except NonFinite as exc:
            return partial(run, exc.code, str(exc))
        except (ParamError, ValueError) as exc:
            return partial(run, "bad_request", str(exc))
        except Exception as exc:
            log.exception("generation %s failed", job.id)
            return partial(run, "internal", f"{type(exc).__name__}: {exc}")

    async def finish(run: Run, body: dict) -> None:
        """Store the final body in DRAFTWIRE_DONE (retrying until acked or past the deadline + a margin)."""
        session = run.job.session
        payload = msgpack.packb(body, unicode_errors="replace")
        give_up = max(run.job.deadline, time.time()) + DONE_MARGIN_S
        backoff = Backoff(initial=0.05, cap=2.0)
        while True:
            try:
                await js.publish(SUBJECTS.done(session), payload, headers={"Nats-Msg-Id": f"done-{session}"})
                return
            except (nats.errors.Error, TimeoutError) as exc:
                if time.time() > give_up:
                    log.error("could not store the result of session %s: %s", session, exc)
                    return
                await asyncio.sleep(backoff.next())

    async def lifecycle(run: Run, parent) -> None:
        job = run.job
        link = NatsEdge(ctx.nc, directory, ctx.tracer, args.verify_timeout, args.verifier_wait,
                        prefer=job.verifier)
        try:
            with ctx.tracer.start_as_current_span("draft.generate", context=parent,
                                                  kind=trace.SpanKind.SERVER) as span:
                span.set_attributes({"draftwire.request_id": job.id, "draftwire.session": job.session,
                                     "draftwire.mode": job.spec.mode, "draftwire.draft_instance": ctx.instance})
                t0 = time.perf_counter()
                body = await execute(run, link)
                stats = body.setdefault("stats", {})
                stats.update(draft_instance=ctx.instance, verifier_instances=link.instances,
                             seed=job.params.seed, session=job.session, failovers=link.failovers,
                             resent_rounds=link.resent,
                             resumed_tokens=len(job.resume), prompt_tokens=len(run.prompt_ids))
                with contextlib.suppress(Exception):  # best effort: the verifier's LRU is the backstop
                    await ctx.nc.publish(SUBJECTS.sessions_close, CloseSession(job.session).encode())
                await publish(SUBJECTS.events_request, {
                    "type": "request", "request_id": job.id, "mode": job.spec.mode, "gamma": job.spec.gamma,
                    "k": job.spec.k, "draft_instance": ctx.instance, "verifier_instances": link.instances,
                    "new_tokens": stats.get("new_tokens", 0), "wall_s": time.perf_counter() - t0,
                    "tokens_per_s": stats.get("tokens_per_s", 0.0),
                    "acceptance_rate": stats.get("acceptance_rate", 0.0),
                    "uplink_bytes": stats.get("uplink_bytes", 0), "downlink_bytes": stats.get("downlink_bytes", 0),
                    "finish_reason": body.get("finish_reason"),
                    "error": body["error"]["code"] if "error" in body else None, "ts": time.time(),
                })
                if job.stream:
                    await publish(stream_subject(job), {**body, "offset": 0, "done": True}, job.format)
                await finish(run, body)
        finally:
            runs.pop(job.session, None)
            for sub in run.subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def prompt_ids_of(job: GenerateJob, pairing: Pairing, target: TargetInfo) -> list[int]:
        if job.messages is not None:
            return pairing.render_chat(model, job.messages, target.chat_template)
        return pairing.encode_prompt(model, job.prompt)

    async def admit(job: GenerateJob) -> tuple[dict, list[int] | None]:
        """The immediate answer to a start, and the prompt's token ids when the job is accepted."""
        if job.deadline and time.time() > job.deadline:
            return error_body("deadline_exceeded", "the job's deadline passed before it started", job.id), None
        target = directory.cached_target()
        if target is None:
            with contextlib.suppress(nats.errors.Error, TimeoutError, ValueError, RemoteError):
                target = await directory.target(time.time() + INFO_QUICK_S)
        if job.messages is not None:  # a chat, rendered as the target's template says (ours if none is known)
            template = target.chat_template if target is not None else None
            try:
                prompt_ids = await asyncio.to_thread(model.render_chat, job.messages, template)
            except Exception as exc:  # noqa: BLE001 - no template, or a template that refuses these messages
                return error_body("bad_request", f"cannot render the chat: {exc}", job.id), None
        else:
            prompt_ids = await asyncio.to_thread(model.encode, job.prompt)
        if not prompt_ids:
            return error_body("bad_request", "the prompt is empty after tokenization", job.id), None
        if message := context_error(len(prompt_ids), job.params.max_new_tokens, drafter(job), target):
            return error_body("context_length_exceeded", message, job.id), None
        return {"accepted": True, "instance": ctx.instance}, prompt_ids

    async def handle_start(req: Request) -> None:
        try:
            job = GenerateJob.decode(req.data)
        except RequestError as exc:
            await req.respond(msgpack.packb(error_body(exc.code, str(exc), exc.request_id)))
            return
        if job.session in runs:
            await req.respond(msgpack.packb({"accepted": True, "instance": ctx.instance}))
            return
        reply, prompt_ids = await admit(job)
        if prompt_ids is None or job.session in runs:  # (a twin start may have won while we tokenized)
            await req.respond(msgpack.packb(reply))
            return
        run = Run(job, prompt_ids)

        async def on_session_ping(msg) -> None:
            # `generated` lets the scheduler resume the job after what is committed, should this instance die
            if msg.reply:
                generated = run.session.generated if run.session is not None else list(job.resume)
                await msg.respond(msgpack.packb({"instance": ctx.instance, "round": run.round,
                                                 "generated": generated}))

        async def on_cancel(_msg) -> None:
            run.cancelled.set()

        try:
            run.subs.append(await ctx.nc.subscribe(SUBJECTS.draft_session(job.session, prefix), cb=on_session_ping))
            cancels = SUBJECTS.draft_cancel(job.session, prefix) if device else SUBJECTS.cancel(job.id, job.tenant)
            run.subs.append(await ctx.nc.subscribe(cancels, cb=on_cancel))
        except nats.errors.Error as exc:  # a run that cannot be watched or cancelled must not be accepted
            for sub in run.subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await req.respond(msgpack.packb(error_body("unavailable", f"cannot watch the run: {exc}", job.id)))
            return
        runs[job.session] = run
        run.task = asyncio.create_task(lifecycle(run, extract_context(req.headers)))
        await req.respond(msgpack.packb(reply))

    async def cancel_runs() -> None:
        tasks = [r.task for r in runs.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(batcher.close, 10.0)  # drafting threads still waiting get BatcherClosed
        log.info("drafted %d rows in %d forwards", batcher.rows, batcher.passes)
        workers.shutdown(wait=False)

    ctx.cleanups.append(cancel_runs)
    drain = DrainState()
    left: list[dict] = []  # the start endpoints a drain left, for a resume
    starts = {SUBJECTS.draft_start, SUBJECTS.draft_start_instance(ctx.instance, prefix)}

    async def begin_drain(_grace_s: float) -> None:
        """Take no job (leave the start subjects), finish the generations running here: no grace applies."""
        if not drain.draining:
            drain.begin(time.monotonic())
            left[:] = await leave(svc, starts)
            log.info("draining: %d generation(s) finish here, no new job is taken", len(runs))

    async def end_drain() -> None:
        if drain.draining:
            drain.resume()
            await rejoin(svc, left)
            left.clear()
            log.info("drain ended: taking jobs again")

    handle_drain = drain_endpoint(begin_drain, end_drain,
                                  lambda: DrainStatus(ctx.instance, drain.draining, len(runs), 0))

    svc = await register(
        ctx,
        "draftwire-draft",
        "draft model and speculative loop (device)",
        [*([] if device else [(SUBJECTS.draft_start, handle_start, "drafts")]),  # the scheduler's fallback
         (SUBJECTS.draft_start_instance(ctx.instance, prefix), handle_start, ctx.instance),  # placed on this one
         (draft_drain_subject(ctx.instance, prefix), handle_drain, ctx.instance)],
        metadata={"model": args.draft_model, "dtype": args.draft_dtype},
        # the scheduler places by it, and a secured draft names its device identity (its subjects' prefix)
        stats=lambda: {"active": len(runs), "max": args.max_concurrent, **({"device": device} if device else {}),
                       **({"draining": True} if drain.draining else {})},
    )
    log.info("drafting with %s (%s)", model.name, model.dtype)


async def _done_stream_ready(js) -> None:
    """Wait until the edge's JetStream answers, so results can be stored, then make sure the results stream
    exists. A draft on a device site's leaf server can start while the site's link to the edge is down: it
    waits for the link (saying so) instead of exiting. A secured device may only look at the stream: the
    scheduler (or `draftwire up`) creates and updates it."""
    backoff = Backoff(initial=0.1, cap=JETSTREAM_WAIT_CAP_S)
    waited = warned = 0.0
    while True:
        try:
            await js.stream_info(bus.DONE_STREAM)
            break
        except nats.js.errors.NotFoundError:
            try:
                await bus.ensure_done_stream(js)
            except (nats.errors.Error, TimeoutError) as exc:  # not allowed to: results wait until it exists
                log.warning("could not create the %s stream (%r); the scheduler creates it", bus.DONE_STREAM, exc)
            break
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) \
                as exc:
            if waited >= warned:
                log.warning("JetStream does not answer (%s) after %.0f s: is the link to the edge down? waiting "
                            "for it", type(exc).__name__, waited)
                warned = waited + JETSTREAM_WARN_EVERY_S
            pause = backoff.next()
            await asyncio.sleep(pause)
            waited += pause
    if waited:
        log.info("JetStream answers after %.1f s", waited)


JETSTREAM_WAIT_CAP_S = 5.0  # the longest pause between two tries
JETSTREAM_WARN_EVERY_S = 30.0


def _stop_message(code: str) -> str:
    return "cancelled by the requester" if code == "cancelled" else "the request's deadline passed"


def main(argv: list[str] | None = None) -> None:
    run("draft", build_parser(), start, argv)


__all__ = ["Run", "Stopped", "TextStream", "context_error", "main"]
