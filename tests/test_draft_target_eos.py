"""The draft service stops on the TARGET's EOS ids, learnt from `draftwire.verifier.info` (tiny-random, seconds).

Losslessness is with respect to the target, whose distribution includes when to stop, so the device must
stop where the target would. The draft service runs in this process against a real nats-server and an
in-process verifier (a real `VerifierCore`) whose info names an EOS id the draft model does not have.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgpack
from nats.micro import add_service
from opentelemetry.trace import NoOpTracer

from draftwire.services.draft.service import build_parser, start
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.prompt_request import GenerateJob
from draftwire.shared.core.speculation import LocalEngine, verify_bytes
from draftwire.shared.core.verifier_sessions import VerifierCore
from draftwire.shared.io.bus import INSTANCE_HEADER, SUBJECTS, VERIFY_QUEUE, connect, flush
from draftwire.shared.io.service_shell import ServiceContext
from draftwire.shared.models.runtime import load_model
from tests.nats_fixtures import *

PROMPT = "hello"


async def serve_verifier(url: str, model, eos: list[int]):
    """A verifier with a real VerifierCore that describes the target with the EOS ids `eos`."""
    nc = await connect(url, name="verifier")
    core = VerifierCore(model)

    async def verify(req) -> None:
        await req.respond(verify_bytes(core, req.data), headers={INSTANCE_HEADER: "v1"})

    async def info(req) -> None:
        await req.respond(msgpack.packb({"instance": "v1", "model": model.name, "vocab_size": model.vocab_size,
                                         "eos_token_ids": eos, "context_length": model.context_length}))

    svc = await add_service(nc, name="draftwire-verifier", version="0.1.0", metadata={"instance": "v1"})
    await svc.add_endpoint(name="verify", subject=SUBJECTS.verify, handler=verify, queue_group=VERIFY_QUEUE)
    await svc.add_endpoint(name="verify-v1", subject=SUBJECTS.verify_instance("v1"), handler=verify)
    await svc.add_endpoint(name="info", subject=SUBJECTS.verifier_info, handler=info, queue_group=VERIFY_QUEUE)
    await flush(nc)
    return nc


async def test_generation_stops_at_the_targets_eos_not_the_drafts(nats_server, nc):
    model = load_model("tiny-random", "fp32", progress=False)
    params, spec = SamplingParams(max_new_tokens=24), SpecParams(mode="tkslt", gamma=3, k=8)
    reference = (await LocalEngine(model, model).agenerate(PROMPT, params, spec)).token_ids
    k = next(i for i in range(3, len(reference)) if reference[i] not in reference[:i])
    eos = reference[k]  # a token the target emits mid-way, which the draft model does not call EOS
    assert eos not in model.eos_token_ids

    verifier = await serve_verifier(nats_server.url, model, [eos])
    args = build_parser().parse_args(["--draft-model", "tiny-random", "--draft-dtype", "fp32"])
    ctx = ServiceContext(name="draft", instance="d1", args=args, nc=await connect(nats_server.url, name="draft"),
                         tracer=NoOpTracer())
    try:
        await start(ctx)
        await flush(ctx.nc)  # as the service shell does before its ready line
        session = uuid.uuid4().hex
        job = GenerateJob("r1", PROMPT, params, spec, format="msgpack", session=session, deadline=time.time() + 60)
        done = await nc.subscribe(SUBJECTS.done(session))
        reply = msgpack.unpackb((await nc.request(SUBJECTS.draft_start, job.encode(), timeout=10)).data)
        assert reply == {"accepted": True, "instance": "d1"}
        body = msgpack.unpackb((await done.next_msg(timeout=60)).data)
        assert "error" not in body, body
        assert body["finish_reason"] == "stop" and body["token_ids"] == reference[: k + 1]
    finally:
        for cleanup in reversed(ctx.cleanups):
            await cleanup()
        for svc in ctx.services:
            await svc.stop()
        await ctx.nc.close()
        await verifier.close()
        await asyncio.sleep(0)
