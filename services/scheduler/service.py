"""Scheduler: pulls prompts from the durable queue, runs each on a draft instance and delivers the result.

Reply subjects. JetStream stores a prompt but not its publisher's reply subject, so every scheduler also
holds a plain core-NATS subscription on `draftwire.prompts` (no queue group: every instance sees every
prompt) that records reply subjects by a digest of (the user's headers, body) for `--request-timeout`
seconds. When the consumer hands this scheduler a prompt, it claims the matching reply subject, waiting up to
a second for it because the two copies of a fresh message race. A prompt published while no scheduler ran
has no known reply subject (its requester is gone anyway): its result goes to `draftwire.results.<id>` only.
Every result and error is published there too, for fire-and-forget publishers. Identical prompts share a
digest; `ReplyBook` ranks the candidates and the JetStream KV bucket `DRAFTWIRE_REPLY_CLAIMS` makes each
claim exclusive (`Scheduler._exclusive`), so schedulers still give each requester exactly one reply.

Acknowledgement. A prompt is acked only after its result or error was published, so delivery is
at-least-once; a malformed prompt is answered and acked at once, never redelivered. While no draft instance
is up the scheduler keeps the prompt and retries (in-progress acks stop JetStream from redelivering it)
rather than nak it towards max_deliver; after `--request-timeout` without one it answers `no_draft`.
Prompts beyond `--max-inflight` are not fetched at all, so they wait in JetStream however long it takes.
On shutdown, unfinished prompts are nak'd so another scheduler (or the next start) takes them at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgpack
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import Request
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.core.params import (
    DEFAULT_GAMMA,
    DEFAULT_K,
    DEFAULT_MODE,
    DEFAULT_POLICY,
    MODES,
    POLICIES,
    ParamError,
    SamplingParams,
    SpecParams,
)
from shared.core.prompt_request import (
    REPLY_CONTENT_TYPES,
    GenerateJob,
    PromptRequest,
    RequestError,
    encode_reply,
    error_body,
    parse_prompt,
)
from shared.io import bus
from shared.io.bus import (
    PROMPT_STREAM,
    ROOT,
    SUBJECTS,
    ensure_prompt_stream,
    ensure_reply_claims,
    extract_context,
    prompt_subscription,
    validate_token,
)
from shared.io.service_shell import ServiceContext, env, env_float, env_int, register, run, service_parser

log = logging.getLogger("draftwire.scheduler")

SESSIONS_SUBJECT = f"{ROOT}.scheduler.sessions"
ACK_WAIT_S = 30.0  # JetStream redelivers a prompt whose scheduler died after this long
HEARTBEAT_S = 10.0  # in-progress acks while working, well inside ACK_WAIT_S
MAX_DELIVER = 10  # graceful restarts nak in-flight prompts; only repeated crashes should exhaust this
FETCH_S = 5.0  # one pull request's lifetime
REPLY_WAIT_S = 1.0  # how long a fresh prompt waits for its core-NATS copy (the reply subject)
FRESH_S = 5.0  # a prompt stored longer ago than this had its core copy recorded already, or never will
CALIBRATE_WINDOW_S = 0.5  # a lone candidate recorded this close to the stored time is surely the one
MAX_DRAFT_BACKOFF_S = 1.0
REPLY_CLAIM_MARGIN_S = 60.0  # a claim outlives the book entries it arbitrates (they expire after the timeout)
SERVICE_ERROR_HEADER = "Nats-Service-Error"


def build_parser():
    p = service_parser("scheduler", __doc__.splitlines()[0])
    p.add_argument(
        "--default-mode",
        default=env("DEFAULT_MODE", DEFAULT_MODE),
        choices=MODES,
        help="mode for requests that ask for `auto` (the default) [DRAFTWIRE_DEFAULT_MODE]",
    )
    p.add_argument(
        "--default-gamma",
        type=int,
        default=env_int("DEFAULT_GAMMA", DEFAULT_GAMMA),
        help="draft tokens per round unless the request sets gamma [DRAFTWIRE_DEFAULT_GAMMA]",
    )
    p.add_argument(
        "--default-k",
        type=int,
        default=env_int("DEFAULT_K", DEFAULT_K),
        help="top-K per draft position unless the request sets k [DRAFTWIRE_DEFAULT_K]",
    )
    p.add_argument(
        "--default-policy",
        default=env("DEFAULT_POLICY", DEFAULT_POLICY),
        choices=POLICIES,
        help="draft-length policy unless the request sets policy [DRAFTWIRE_DEFAULT_POLICY]",
    )
    p.add_argument(
        "--default-pipeline",
        action=argparse.BooleanOptionalAction,
        default=env("DEFAULT_PIPELINE", "0") not in ("0", "false", "no", ""),
        help="pipelined (PEARL) drafting unless the request sets pipeline [DRAFTWIRE_DEFAULT_PIPELINE]",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=env_float("REQUEST_TIMEOUT", 600.0),
        help="seconds a generation may take, and a prompt may wait for a draft instance "
        "[DRAFTWIRE_REQUEST_TIMEOUT]",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=env_int("MAX_INFLIGHT", 8),
        help="prompts this instance works on at once; the rest wait in JetStream [DRAFTWIRE_MAX_INFLIGHT]",
    )
    return p


# --- policy (pure) ----------------------------------------------------------------------------------------


def resolve_spec(req: PromptRequest, defaults: SpecParams) -> SpecParams:
    """Mode `auto` and unset gamma/k/policy/pipeline take the scheduler's defaults; request values win."""
    return SpecParams(
        mode=defaults.mode if req.mode == "auto" else req.mode,
        gamma=defaults.gamma if req.gamma is None else req.gamma,
        k=defaults.k if req.k is None else req.k,
        quant=defaults.quant,
        policy=defaults.policy if req.policy is None else req.policy,
        confidence=defaults.confidence if req.confidence is None else req.confidence,
        pipeline=defaults.pipeline if req.pipeline is None else req.pipeline,
    )


def fresh_seed() -> int:
    return secrets.randbelow(2**63)


def resolve_sampling(req: PromptRequest, draw_seed: Callable[[], int] = fresh_seed) -> SamplingParams:
    """No seed means a fresh random one; the draft reports it in the stats, so any sample can be replayed."""
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        seed=draw_seed() if req.seed is None else req.seed,
        min_new_tokens=req.min_new_tokens,
        max_new_tokens=req.max_new_tokens,
    )


def build_job(
    req: PromptRequest, fmt: str, defaults: SpecParams, draw_seed: Callable[[], int] = fresh_seed
) -> GenerateJob:
    return GenerateJob(
        id=req.id,
        prompt=req.prompt,
        params=resolve_sampling(req, draw_seed),
        spec=resolve_spec(req, defaults),
        stream=req.stream,
        format=fmt,
        session=secrets.token_hex(16),
    )


def draft_result(data: bytes, headers: Mapping[str, str] | None, request_id: str) -> dict:
    """The draft's msgpack reply as a reply body: its result or error as is, anything else a draft_error."""
    if headers and headers.get(SERVICE_ERROR_HEADER):
        return error_body(
            "draft_error", f"draft instance failed: {headers[SERVICE_ERROR_HEADER]}", request_id
        )
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises a zoo (ExtraData, FormatError, UnicodeDecodeError)
        body = None
    if not isinstance(body, dict):
        return error_body("draft_error", "draft instance sent an undecodable reply", request_id)
    return {**body, "id": request_id}


def reply_key(headers: Mapping[str, str] | None, data: bytes) -> bytes:
    """Digest that identifies one published prompt in both its core-NATS and its JetStream copy.

    `Nats-*` headers are left out: they are the server's and JetStream's business, not the user's.
    """
    user = sorted((k.lower(), v) for k, v in (headers or {}).items() if not k.lower().startswith("nats-"))
    h = hashlib.blake2b(repr(user).encode("utf-8", "replace"), digest_size=20)
    h.update(data)
    return h.digest()


@dataclass(eq=False)
class Captured:
    reply: str | None
    recorded_at: float
    expires_at: float
    index: int  # arrival order among all prompts this book saw


class ReplyBook:
    """Reply subjects seen on core NATS, matched to JetStream deliveries by digest. Time is passed in.

    Identical prompts share a digest, and every scheduler records every copy, so the schedulers must agree
    on which entry belongs to which stream message. Each ranks the candidates by arrival order:
    the stream numbers the prompts in (practically) the order the core copies arrive, so the entry whose
    index is closest to `seq - offset` wins. The offset is calibrated from the stream's last sequence at
    start and refined by every delivery whose digest has a single candidate. Without an offset, the entry
    recorded closest in time to when the stream stored the message wins. Arrival order can differ between
    schedulers (NATS does not order copies from different connections across subscribers), so the shell
    confirms each pick in the claims bucket and moves to the next candidate when another scheduler holds it
    (`drop`). A pick is remembered per stream sequence, so a redelivery finds the same reply subject again.
    """

    def __init__(self, ttl: float, first_seq: int = 1, *, max_entries: int = 100_000):
        self.ttl, self.first_seq, self.max_entries = ttl, first_seq, max_entries
        self.offset: int | None = None  # stream sequence minus arrival index
        self._next_index = 0
        self._pending: dict[bytes, list[Captured]] = {}
        self._order: deque[tuple[bytes, Captured]] = deque()
        self._claimed: dict[int, Captured] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def calibrate(self, next_seq: int) -> None:
        """The next prompt to arrive will be stored as `next_seq` (the stream's last sequence + 1)."""
        self.offset = next_seq - self._next_index

    def record(self, key: bytes, reply: str | None, now: float) -> None:
        entry = Captured(reply or None, now, now + self.ttl, self._next_index)
        self._next_index += 1
        self._pending.setdefault(key, []).append(entry)
        self._order.append((key, entry))
        self.prune(now)

    def candidates(self, key: bytes, seq: int, stored_at: float, now: float) -> list[Captured]:
        """The entries that may hold this stream message's reply subject, most likely first.

        A message this book already took an entry for gets that entry alone (a redelivery).
        """
        if (entry := self._claimed.get(seq)) is not None:
            return [entry]
        if seq < self.first_seq:
            return []  # stored before we listened: nobody recorded its reply subject
        live = [e for e in self._pending.get(key, ()) if e.expires_at > now]
        if len(live) > 1 and self.offset is not None:
            expected = seq - self.offset
            return sorted(live, key=lambda e: (abs(e.index - expected), abs(e.recorded_at - stored_at)))
        return sorted(live, key=lambda e: abs(e.recorded_at - stored_at))

    def take(self, key: bytes, entry: Captured, seq: int, stored_at: float) -> None:
        """`entry` answers stream message `seq`; a lone, timely candidate also calibrates the offset."""
        if self._claimed.get(seq) is entry:
            return
        if self._pending.get(key) == [entry] and abs(entry.recorded_at - stored_at) <= CALIBRATE_WINDOW_S:
            self.offset = seq - entry.index
        self._discard(key, entry)
        self._claimed[seq] = entry

    def drop(self, key: bytes, entry: Captured) -> None:
        """Another scheduler answers this entry's requester: it is no candidate here any more."""
        self._discard(key, entry)

    def claim(self, key: bytes, seq: int, stored_at: float, now: float) -> Captured | None:
        """The most likely entry, taken: a lone scheduler's pick (the service confirms each in `_exclusive`)."""
        found = self.candidates(key, seq, stored_at, now)
        if found:
            self.take(key, found[0], seq, stored_at)
        return found[0] if found else None

    def may_arrive(self, seq: int, stored_at: float, now: float) -> bool:
        """Whether waiting can still bring this prompt's core copy (the two copies race by milliseconds)."""
        return seq >= self.first_seq and now - stored_at <= FRESH_S

    def release(self, seq: int) -> None:
        self._claimed.pop(seq, None)

    def prune(self, now: float) -> None:
        while self._order and (self._order[0][1].expires_at <= now or len(self._order) > self.max_entries):
            self._discard(*self._order.popleft())

    def _discard(self, key: bytes, entry: Captured) -> None:
        queue = self._pending.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(entry)
        if not queue:
            del self._pending[key]


@dataclass(eq=False)
class Session:
    seq: int
    msg: Msg
    started: float = field(default_factory=time.monotonic)
    state: str = "received"
    id: str | None = None
    acked: bool = False
    task: asyncio.Task | None = None


def sessions_snapshot(sessions: list[Session], now: float) -> list[dict]:
    return [
        {"id": s.id, "seq": s.seq, "age_s": round(now - s.started, 3), "state": s.state}
        for s in sorted(sessions, key=lambda s: s.started)
    ]


# --- the async shell --------------------------------------------------------------------------------------


class Scheduler:
    def __init__(
        self,
        nc: Client,
        tracer,
        instance: str,
        defaults: SpecParams,
        request_timeout: float,
        max_inflight: int,
    ) -> None:
        self.nc, self.tracer, self.instance = nc, tracer, instance
        self.defaults, self.timeout = defaults, request_timeout
        self.slots = asyncio.Semaphore(max_inflight)
        self.sessions: dict[int, Session] = {}
        self.book = ReplyBook(ttl=request_timeout)
        self.stopping = False
        self._recorded = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._capture = None
        self._psub = None
        self._claims = None

    async def start(self) -> None:
        js = self.nc.jetstream()
        await ensure_prompt_stream(js, ack_wait=ACK_WAIT_S, max_deliver=MAX_DELIVER)
        try:
            self._claims = await ensure_reply_claims(js, ttl=self.timeout + REPLY_CLAIM_MARGIN_S)
        except Exception:  # e.g. a server with no JetStream memory store: fine for a lone scheduler
            log.warning("no reply-claims bucket; several schedulers may disagree on identical prompts",
                        exc_info=True)
        # Listen before pulling, so every prompt stored from now on has its reply subject recorded; those
        # stored before (up to first_seq) never will, and need not be waited for.
        self.book.first_seq = (await js.stream_info(PROMPT_STREAM)).state.last_seq + 1
        self._capture = await self.nc.subscribe(SUBJECTS.prompts, cb=self._record)
        await self.nc.flush()
        self.book.calibrate((await js.stream_info(PROMPT_STREAM)).state.last_seq + 1)
        self._psub = await prompt_subscription(js)
        self._loop_task = asyncio.create_task(self._pull_loop(), name="scheduler-pull")

    async def stop(self) -> None:
        """Stop pulling, then nak unfinished prompts (unsubscribed first, so they go to another scheduler)."""
        self.stopping = True
        if self._loop_task is not None:
            # Cancelling a fetch loses nothing: the server drops a pull request once its inbox is gone.
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for sub in (self._psub, self._capture):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        tasks = [s.task for s in self.sessions.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # core-NATS copy: remember who is waiting for which prompt
    async def _record(self, msg: Msg) -> None:
        self.book.record(reply_key(msg.headers, msg.data), msg.reply, time.time())
        event, self._recorded = self._recorded, asyncio.Event()
        event.set()

    async def _reply_for(self, s: Session) -> str | None:
        key, stored_at = reply_key(s.msg.headers, s.msg.data), s.msg.metadata.timestamp.timestamp()
        deadline = time.monotonic() + REPLY_WAIT_S
        while True:
            recorded = self._recorded
            for entry in self.book.candidates(key, s.seq, stored_at, time.time()):
                if await self._exclusive(entry, s.seq):
                    self.book.take(key, entry, s.seq, stored_at)
                    return entry.reply
                self.book.drop(key, entry)
            left = deadline - time.monotonic()
            if left <= 0 or not self.book.may_arrive(s.seq, stored_at, time.time()):
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorded.wait(), left)

    async def _exclusive(self, entry: Captured, seq: int) -> bool:
        """Whether this reply subject is ours to answer for stream message `seq`, across all schedulers.

        Each scheduler orders identical prompts by the arrival order it saw, and NATS may deliver copies
        from different connections to two subscribers in different orders; so two schedulers could both
        pick one requester's reply subject and leave another requester with none. The first to create the
        subject's key in the claims bucket wins it; the other moves on to its next candidate.
        """
        if entry.reply is None or self._claims is None:
            return True
        name = "r" + hashlib.blake2b(entry.reply.encode(), digest_size=16).hexdigest()
        mine = str(seq).encode()
        try:
            await self._claims.create(name, mine)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                held = await self._claims.get(name)
                return held.value == mine  # ours already (a redelivery of the same message)
            return False
        except Exception:  # the bucket is unreachable: answer on our own guess rather than not at all
            log.warning("reply claim for stream message %d failed; answering without it", seq, exc_info=True)
            return True

    # JetStream copy: the durable work queue
    async def _pull_loop(self) -> None:
        while not self.stopping:
            await self.slots.acquire()
            try:
                msgs = await self._psub.fetch(1, timeout=FETCH_S)
            except TimeoutError:
                self.slots.release()
                continue
            except asyncio.CancelledError:
                self.slots.release()
                raise
            except Exception as exc:  # noqa: BLE001 - reconnects, consumer errors: keep pulling
                self.slots.release()
                log.warning("fetching prompts failed: %r; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                await self._admit(msg)

    async def _admit(self, msg: Msg) -> None:
        """Start a session for a delivered prompt; the session owns the slot the fetch took."""
        seq = msg.metadata.sequence.stream
        if self.stopping or seq in self.sessions:
            # A redelivery of a prompt still in progress here (an in-progress ack got lost): keep working on
            # it with the newer delivery's ack subject. On shutdown, hand the prompt straight back.
            if seq in self.sessions and not self.stopping:
                self.sessions[seq].msg = msg
            else:
                await _quietly(msg.nak())
            self.slots.release()
            return
        s = Session(seq=seq, msg=msg)
        self.sessions[seq] = s
        s.task = asyncio.create_task(self._serve(s), name=f"prompt-{seq}")

    async def _serve(self, s: Session) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(s))
        try:
            await self._process(s)
        except asyncio.CancelledError:
            if not s.acked:
                await _quietly(s.msg.nak())
            raise
        except Exception:  # one prompt must never take the loop or another prompt down
            log.exception("prompt seq=%d id=%s failed; it will be redelivered", s.seq, s.id)
            if not s.acked:
                await _quietly(s.msg.nak(delay=5))
        finally:
            heartbeat.cancel()
            self.sessions.pop(s.seq, None)
            self.book.release(s.seq)
            self.slots.release()

    async def _heartbeat(self, s: Session) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await _quietly(s.msg.in_progress())

    async def _process(self, s: Session) -> None:
        headers = s.msg.headers or {}
        reply = await self._reply_for(s)
        with self.tracer.start_as_current_span(
            "scheduler.request", context=extract_context(headers), kind=SpanKind.CONSUMER
        ) as span:
            span.set_attributes(
                {
                    "draftwire.stream_seq": s.seq,
                    "draftwire.deliveries": s.msg.metadata.num_delivered,
                    "draftwire.scheduler_instance": self.instance,
                    "draftwire.has_reply": reply is not None,
                }
            )
            s.state = "parsing"
            try:
                req, fmt = parse_prompt(s.msg.data, headers)
            except RequestError as exc:
                request_id, fmt = exc.request_id, exc.format or "json"
                body = error_body(exc.code, str(exc), request_id)
            else:
                request_id = s.id = req.id
                job = build_job(req, fmt, self.defaults)
                span.set_attributes(
                    {
                        "draftwire.request_id": job.id,
                        "draftwire.mode": job.spec.mode,
                        "draftwire.gamma": job.spec.gamma,
                        "draftwire.k": job.spec.k,
                        "draftwire.format": fmt,
                    }
                )
                body = await self._run(job, s)
            if "error" in body:
                code = str(body["error"].get("code", "error")) if isinstance(body["error"], dict) else "error"
                span.set_status(Status(StatusCode.ERROR, code))
                span.set_attribute("draftwire.error", code)
            s.state = "delivering"
            await self._deliver(body, fmt, reply, request_id)
        await self._ack(s)

    async def _run(self, job: GenerateJob, s: Session) -> dict:
        """Ask a draft instance (queue group) to generate; wait for one to exist, but not forever."""
        payload = job.encode()
        give_up = time.monotonic() + self.timeout
        backoff = 0.1
        while True:
            s.state = "generating"
            try:
                msg = await bus.request(self.nc, SUBJECTS.draft_start, payload, timeout=self.timeout)
            except nats.errors.NoRespondersError:
                if time.monotonic() >= give_up:
                    return error_body("no_draft", f"no draft instance came up for {self.timeout:g} s", job.id)
                s.state = "waiting_for_draft"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_DRAFT_BACKOFF_S)
                continue
            except TimeoutError:
                return error_body(
                    "timeout", f"session stuck for {self.timeout:g} s: no result from the draft", job.id
                )
            return draft_result(msg.data, msg.headers, job.id)

    async def _deliver(self, body: dict, fmt: str, reply: str | None, request_id: str | None) -> None:
        data = encode_reply(body, fmt)
        if len(data) > self.nc.max_payload:
            message = f"result is {len(data)} bytes, over the server's max_payload {self.nc.max_payload}"
            data = encode_reply(error_body("oversize", message, request_id), fmt)
        headers = {"Content-Type": REPLY_CONTENT_TYPES[fmt]}
        if reply:
            await bus.publish(self.nc, reply, data, headers)
        if request_id:
            await bus.publish(self.nc, SUBJECTS.results(request_id), data, headers)

    async def _ack(self, s: Session) -> None:
        try:
            await s.msg.ack_sync(timeout=5)
        except Exception as exc:  # noqa: BLE001 - the result is out; a lost ack only means a repeat
            log.warning("ack of prompt seq=%d id=%s failed: %r", s.seq, s.id, exc)
        s.acked = True
        s.state = "done"

    async def sessions_endpoint(self, req: Request) -> None:
        body = {
            "instance": self.instance,
            "sessions": sessions_snapshot(list(self.sessions.values()), time.monotonic()),
        }
        await req.respond(json.dumps(body).encode())


async def _quietly(aw) -> None:
    """Best-effort acks: a closed connection must not turn cleanup into a crash."""
    try:
        await aw
    except Exception as exc:  # noqa: BLE001
        log.debug("best-effort ack failed: %r", exc)


def defaults_from_args(args) -> SpecParams:
    try:
        defaults = SpecParams(mode=args.default_mode, gamma=args.default_gamma, k=args.default_k,
                              policy=args.default_policy, pipeline=args.default_pipeline)
    except ParamError as exc:
        raise SystemExit(f"draftwire-scheduler: error: {exc}") from None
    if not args.request_timeout > 0:
        raise SystemExit("draftwire-scheduler: error: --request-timeout must be > 0")
    if args.max_inflight < 1:
        raise SystemExit("draftwire-scheduler: error: --max-inflight must be >= 1")
    return defaults


async def start(ctx: ServiceContext) -> Scheduler:
    args = ctx.args
    defaults = defaults_from_args(args)
    validate_token(ctx.instance, "instance")
    scheduler = Scheduler(ctx.nc, ctx.tracer, ctx.instance, defaults, args.request_timeout, args.max_inflight)
    await scheduler.start()
    ctx.cleanups.append(scheduler.stop)
    await register(
        ctx,
        "draftwire-scheduler",
        "takes prompts from the durable queue and runs them on draft instances",
        [
            (SESSIONS_SUBJECT, scheduler.sessions_endpoint, "schedulers"),
            (f"{SESSIONS_SUBJECT}.{ctx.instance}", scheduler.sessions_endpoint, ctx.instance),
        ],
        metadata={
            "default_mode": defaults.mode,
            "default_gamma": str(defaults.gamma),
            "default_k": str(defaults.k),
            "default_policy": defaults.policy,
            "default_pipeline": str(defaults.pipeline).lower(),
        },
    )
    ctx.ready_info["mode"] = defaults.mode
    log.info(
        "scheduling: default %s gamma=%d k=%d, timeout %gs, %d in flight",
        defaults.mode,
        defaults.gamma,
        defaults.k,
        args.request_timeout,
        args.max_inflight,
    )
    return scheduler


def main(argv: list[str] | None = None) -> None:
    run("scheduler", build_parser(), start, argv)


__all__ = [
    "ReplyBook",
    "Scheduler",
    "build_job",
    "build_parser",
    "main",
    "resolve_sampling",
    "resolve_spec",
    "start",
]
