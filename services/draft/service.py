"""Draft (device): runs `shared.core.speculation.speculate` for each job, over a NATS link to the verifiers.

Jobs arrive from the scheduler on `draftwire.draft.start` (queue group `drafts`); the reply is sent when the
generation is over. Accepted text is published on `draftwire.stream.<id>` as it is verified, and every round
and request is published as a telemetry event. The link sticks to the verifier instance that answered first
(its KV cache holds the session); if that instance disappears it falls back to the queue group, where
another verifier rebuilds the session from the token history the loop resends, so the request completes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import nats.errors
from nats.micro import Request
from opentelemetry import trace

from shared.core.draft_length_policy import AdaptiveGamma, CostModel, make_policy
from shared.core.params import ParamError
from shared.core.prompt_request import GenerateJob, RequestError, encode_reply, error_body
from shared.core.protocol import Verdict, VerifyRequest, decode_any
from shared.core.round_stats import RoundStats
from shared.core.speculation import RemoteError, new_session, speculate
from shared.io import bus
from shared.io.bus import INSTANCE_HEADER, SUBJECTS, extract_context
from shared.io.service_shell import (
    ServiceContext,
    add_model_flags,
    env_float,
    env_int,
    register,
    run,
    service_parser,
)
from shared.models.runtime import load_model

log = logging.getLogger("draftwire.draft")
SERVICE_ERROR_HEADER = "Nats-Service-Error"


def build_parser():
    p = service_parser("draft", __doc__.splitlines()[0])
    add_model_flags(p, "draft", "int8")
    p.add_argument(
        "--max-concurrent", type=int, default=env_int("MAX_CONCURRENT", 4),
        help="generations run at once; more wait [DRAFTWIRE_MAX_CONCURRENT]",
    )
    p.add_argument(
        "--verify-timeout", type=float, default=env_float("VERIFY_TIMEOUT", 15.0),
        help="seconds to wait for one verify reply before trying another verifier [DRAFTWIRE_VERIFY_TIMEOUT]",
    )
    p.add_argument(
        "--verifier-wait", type=float, default=env_float("VERIFIER_WAIT", 120.0),
        help="seconds a round may wait for any verifier to appear [DRAFTWIRE_VERIFIER_WAIT]",
    )
    return p


class NatsEdge:
    """One session's path to the edge: sticky to a verifier instance, failing over through the queue group."""

    def __init__(self, nc, tracer, verify_timeout: float, verifier_wait: float) -> None:
        self.nc = nc
        self.tracer = tracer
        self.verify_timeout = verify_timeout
        self.verifier_wait = verifier_wait
        self.instance: str | None = None
        self.instances: list[str] = []

    async def exchange(self, uplink: bytes, req: VerifyRequest) -> bytes:
        deadline = time.monotonic() + self.verifier_wait
        backoff = 0.1
        while True:
            subject = SUBJECTS.verify_instance(self.instance) if self.instance else SUBJECTS.verify
            try:
                with self.tracer.start_as_current_span("verify_rpc", kind=trace.SpanKind.CLIENT) as span:
                    span.set_attributes({"draftwire.uplink_bytes": len(uplink), "messaging.destination": subject})
                    t_send = time.time_ns()
                    msg = await bus.request(self.nc, subject, uplink, timeout=self.verify_timeout)
                    self._link_spans(t_send, time.time_ns(), msg.data)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                if self.instance is not None:
                    log.warning("verifier %s unavailable (%s); failing over", self.instance, type(exc).__name__)
                    self.instance = None
                    continue
                if time.monotonic() > deadline:
                    raise RemoteError("no_verifier", f"no verifier answered for {self.verifier_wait:.0f}s") from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            headers = msg.headers or {}
            if SERVICE_ERROR_HEADER in headers:
                raise RemoteError("verifier_error", headers.get(SERVICE_ERROR_HEADER, "unknown"))
            instance = headers.get(INSTANCE_HEADER)
            if instance and instance != self.instance:
                self.instance = instance
                self.instances.append(instance)
            return msg.data

    def _link_spans(self, t_send: int, t_recv: int, downlink: bytes) -> None:
        """Split the round trip into uplink / edge / downlink spans from the verdict's own timestamps."""
        try:
            reply = decode_any(downlink)
        except ValueError:
            return
        if not isinstance(reply, Verdict) or reply.sent_at <= 0:
            return
        down_ns = max(0, min(t_recv - int(reply.sent_at * 1e9), t_recv - t_send))
        up_ns = max(0, t_recv - t_send - down_ns - int(reply.verify_s * 1e9))
        self.tracer.start_span("uplink", start_time=t_send).end(end_time=t_send + up_ns)
        self.tracer.start_span("downlink", start_time=t_recv - down_ns).end(end_time=t_recv)


class TextStream:
    """Turns committed token ids into text deltas, holding back an incomplete UTF-8 character."""

    def __init__(self, decode) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, new: list[int]) -> str:
        self.tokens.extend(new)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


async def start(ctx: ServiceContext) -> None:
    args = ctx.args
    if args.max_concurrent < 1:
        raise SystemExit("draftwire-draft: error: --max-concurrent must be >= 1")
    model = await asyncio.to_thread(load_model, args.draft_model, args.draft_dtype, False)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft")
    slots = asyncio.Semaphore(args.max_concurrent)
    tasks: set[asyncio.Task] = set()
    warm: dict[tuple[str, int], CostModel] = {}  # adaptive draft length: per (mode, K), across sessions
    loop = asyncio.get_running_loop()

    async def compute(fn):
        return await loop.run_in_executor(worker, fn)

    async def publish(subject: str, body: dict, fmt: str = "msgpack") -> None:
        try:
            await ctx.nc.publish(subject, encode_reply(body, fmt))
        except Exception:  # telemetry and streams are best effort; the result reply is what matters
            log.debug("publish to %s failed", subject, exc_info=True)

    async def generate(job: GenerateJob, link: NatsEdge) -> dict:
        session = new_session(
            model, model, model.eos_token_ids, model.vocab_size, job.prompt, job.params, job.spec, job.id
        )
        text = TextStream(model.decode)

        async def on_round(rs: RoundStats, new: list[int]) -> None:
            event = {"type": "round", "request_id": job.id, "mode": job.spec.mode, "gamma": rs.drafted,
                     "draft_instance": ctx.instance, "verifier_instance": link.instance or "",
                     **rs.to_dict(), "ts": time.time()}
            await publish(SUBJECTS.events_round, event)
            if job.stream:
                await publish(SUBJECTS.stream(job.id),
                              {"id": job.id, "text": text.push(new), "token_ids": new, "done": False}, job.format)

        key = (job.spec.mode, job.spec.k)
        policy = make_policy(job.spec.policy, job.spec.gamma, warm.get(key))
        result = await speculate(
            session, link, decode=model.decode, compute=compute, on_round=on_round, tracer=ctx.tracer,
            policy=policy,
        )
        if isinstance(policy, AdaptiveGamma):  # the next session on this device starts from what this one learnt
            warm[key] = policy.model
        body = {"id": job.id, **{k: v for k, v in result.to_dict().items() if k != "rounds"}}
        body["stats"].update(draft_instance=ctx.instance, verifier_instances=link.instances,
                             seed=job.params.seed)
        return body

    async def run_job(req: Request) -> None:
        job_id = None
        try:
            job = GenerateJob.decode(req.data)
            job_id = job.id
        except RequestError as exc:
            await req.respond(msgpack.packb(error_body(exc.code, str(exc))))
            return
        link = NatsEdge(ctx.nc, ctx.tracer, args.verify_timeout, args.verifier_wait)
        with ctx.tracer.start_as_current_span(
            "draft.generate", context=extract_context(req.headers), kind=trace.SpanKind.SERVER
        ) as span:
            span.set_attributes({"draftwire.request_id": job.id, "draftwire.mode": job.spec.mode,
                                 "draftwire.draft_instance": ctx.instance})
            t0 = time.perf_counter()
            async with slots:
                try:
                    body = await generate(job, link)
                except RemoteError as exc:
                    body = error_body(exc.code, exc.message, job.id)
                except (ParamError, ValueError) as exc:
                    body = error_body("bad_request", str(exc), job.id)
                except Exception as exc:
                    log.exception("generation %s failed", job_id)
                    body = error_body("internal", f"{type(exc).__name__}: {exc}", job.id)
            stats = body.get("stats", {})
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
                await publish(SUBJECTS.stream(job.id), {**body, "done": True}, job.format)
        await req.respond(msgpack.packb(body))

    async def handle(req: Request) -> None:
        # micro runs one handler at a time per subscription: each job gets its own task
        task = asyncio.create_task(run_job(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def cancel_jobs() -> None:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        worker.shutdown(wait=False)

    ctx.cleanups.append(cancel_jobs)
    await register(
        ctx,
        "draftwire-draft",
        "draft model and speculative loop (device)",
        [(SUBJECTS.draft_start, handle, "drafts")],
        metadata={"model": args.draft_model, "dtype": args.draft_dtype},
    )
    log.info("drafting with %s (%s)", model.name, model.dtype)


def main(argv: list[str] | None = None) -> None:
    run("draft", build_parser(), start, argv)


__all__ = ["NatsEdge", "TextStream", "main"]
