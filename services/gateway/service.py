"""OpenAI-compatible HTTP gateway: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, on the NATS contract.

A client of the scheduler like any other (no shortcut into the services): each HTTP request becomes one request
on `draftwire.prompts[.<tenant>]` (the tenant being this gateway's identity when secured), streamed responses
come from `draftwire.stream.<...>` as server-sent events, and a client that disconnects cancels its generation
(`draftwire.cancel.<...>`). The translation is `draftwire.shared.core.openai_api`; this module moves bytes. `--api-key`
makes every request carry `Authorization: Bearer <key>`, as OpenAI's clients send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time

import nats.errors
from aiohttp import web

from draftwire.shared.core import openai_api as api
from draftwire.shared.core.protocol import TargetInfo
from draftwire.shared.io.bus import SUBJECTS
from draftwire.shared.io.credentials import identity_name
from draftwire.shared.io.service_shell import ServiceContext, env, env_float, register, run, service_parser

log = logging.getLogger("draftwire.gateway")

DEFAULT_HTTP_PORT = 8000  # vLLM's
LAST_CHUNK_WAIT_S = 1.0  # after the result, for the stream's last chunk (relayed when secured)


def build_parser():
    p = service_parser("gateway", __doc__.splitlines()[0])
    p.add_argument("--http-host", default=env("GATEWAY_HOST", "127.0.0.1"), help="[DRAFTWIRE_GATEWAY_HOST]")
    p.add_argument("--http-port", type=int, default=int(env("GATEWAY_PORT", str(DEFAULT_HTTP_PORT))),
                   help="0 picks a free port [DRAFTWIRE_GATEWAY_PORT]")
    p.add_argument("--api-key", default=env("API_KEY"),
                   help="require `Authorization: Bearer KEY` on every request [DRAFTWIRE_API_KEY]")
    p.add_argument("--request-timeout", type=float, default=env_float("GATEWAY_TIMEOUT", 600.0),
                   help="each request's deadline in seconds [DRAFTWIRE_GATEWAY_TIMEOUT]")
    return p


def _json_error(err: api.ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


class Gateway:
    def __init__(self, nc, tenant: str, api_key: str | None, timeout: float) -> None:
        self.nc, self.tenant, self.api_key, self.timeout = nc, tenant, api_key, timeout
        self._target: TargetInfo | None = None

    async def target(self) -> TargetInfo:
        if self._target is None:
            try:
                msg = await self.nc.request(SUBJECTS.verifier_info, b"", timeout=5)
                self._target = TargetInfo.decode(msg.data)
            except Exception as exc:  # noqa: BLE001 - no verifier: the API says so
                raise api.ApiError(503, f"no verifier answered: {type(exc).__name__}", "server_error",
                                   code="no_verifier") from None
        return self._target

    @web.middleware
    async def guard(self, request: web.Request, handler):
        """The API key, and every failure as OpenAI's error shape (never a bare 500 page)."""
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _json_error(api.ApiError(401, "invalid or missing API key", "authentication_error",
                                            code="invalid_api_key"))
        try:
            return await handler(request)
        except api.ApiError as err:
            return _json_error(err)
        except web.HTTPException as exc:
            return _json_error(api.ApiError(exc.status, exc.reason, code=str(exc.status)))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # a bug: still OpenAI's shape, and the gateway stays up
            log.exception("request to %s failed", request.path)
            return _json_error(api.ApiError(500, f"{type(exc).__name__}: {exc}", "server_error", code="internal"))

    async def models(self, _: web.Request) -> web.Response:
        target = await self.target()
        return web.json_response({"object": "list", "data": [
            {"id": target.model, "object": "model", "created": 0, "owned_by": "draftwire"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise api.ApiError(400, "the request body is not valid JSON") from None
        rid = secrets.token_hex(12)
        translate = api.chat_request if chat else api.completion_request
        draftwire_body = translate(body, rid, self.timeout)
        model = (await self.target()).model
        if isinstance(body, dict) and body.get("model") not in (None, model, "draftwire"):
            raise api.ApiError(404, f"the model {body.get('model')!r} does not exist; this server serves {model!r}",
                               code="model_not_found", param="model")
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        created = int(time.time())
        try:
            if draftwire_body["stream"]:
                return await self._stream(request, draftwire_body, response_id, model, created, chat,
                                           api.wants_usage(body))
            result = await self._ask(draftwire_body)
            if "error" in result:
                raise api.from_draftwire_error(result["error"])
            shape = api.chat_response if chat else api.completion_response
            return web.json_response(shape(result, response_id, model, created))
        except asyncio.CancelledError:  # the client went away: so does its generation
            await self._cancel(rid)
            raise

    async def _ask(self, body: dict) -> dict:
        try:
            msg = await self.nc.request(SUBJECTS.prompts_for(self.tenant), json.dumps(body).encode(),
                                        timeout=self.timeout + 30)
        except nats.errors.NoRespondersError:
            raise api.ApiError(503, "no scheduler is running", "server_error", code="no_scheduler") from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise api.ApiError(504, "no answer from the scheduler in time", "timeout", code="timeout") from None
        return json.loads(msg.data)

    async def _cancel(self, rid: str) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(SUBJECTS.cancel(rid, self.tenant), b"")
            await self.nc.flush(timeout=1)
        log.info("request %s cancelled: its client disconnected", rid)

    async def _stream(self, request: web.Request, body: dict, response_id: str, model: str, created: int,
                      chat: bool, include_usage: bool) -> web.StreamResponse:
        chunks: asyncio.Queue = asyncio.Queue()

        async def on_chunk(msg) -> None:
            chunks.put_nowait(json.loads(msg.data))

        sub = await self.nc.subscribe(SUBJECTS.stream(body["id"], self.tenant), cb=on_chunk)
        reply = asyncio.ensure_future(self._ask(body))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            first = True

            async def send(obj: dict | str) -> None:
                data = obj if isinstance(obj, str) else json.dumps(obj)
                await response.write(f"data: {data}\n\n".encode())

            async def send_text(text: str) -> None:
                nonlocal first
                if chat:
                    delta = {"role": "assistant", "content": text} if first else {"content": text}
                    await send(api.chat_chunk(response_id, model, created, delta))
                else:
                    await send(api.completion_chunk(response_id, model, created, text))
                first = False

            if chat:
                await send_text("")  # the role first, as OpenAI streams it
            done_chunk = False
            while not reply.done() or not chunks.empty():
                getter = asyncio.ensure_future(chunks.get())
                await asyncio.wait({getter, reply}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                chunk = getter.result()
                if chunk.get("done"):
                    done_chunk = True
                elif chunk.get("text"):
                    await send_text(chunk["text"])
            try:
                result = reply.result()
            except api.ApiError as err:
                result = {"error": None, "api": err}
            if "error" in result:
                err = result.get("api") or api.from_draftwire_error(result["error"])
                await send(err.body())
            else:
                if not done_chunk:  # the last chunks may trail the reply
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LAST_CHUNK_WAIT_S):
                            while not (chunk := await chunks.get()).get("done"):
                                if chunk.get("text"):
                                    await send_text(chunk["text"])
                finish = api.finish_reason(result)
                if chat:
                    await send(api.chat_chunk(response_id, model, created, {}, finish))
                else:
                    await send(api.completion_chunk(response_id, model, created, "", finish))
                if include_usage:
                    await send(api.usage_chunk(response_id, model, created, result, chat))
            await send("[DONE]")
            await response.write_eof()
            return response
        except (ConnectionResetError, asyncio.CancelledError):  # the client is gone
            await self._cancel(body["id"])
            if not reply.done():
                reply.cancel()
            raise
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def make_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[gateway.guard], client_max_size=1 << 20)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_post("/v1/chat/completions", gateway.chat)
    app.router.add_post("/v1/completions", gateway.completions)
    return app


async def start(ctx: ServiceContext) -> None:
    args = ctx.args
    tenant = identity_name(args.creds)
    gateway = Gateway(ctx.nc, tenant, args.api_key, args.request_timeout)
    runner = web.AppRunner(make_app(gateway), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.http_host, args.http_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"draftwire-gateway: error: cannot listen on {args.http_host}:{args.http_port}: {exc}")
    ctx.cleanups.append(runner.cleanup)
    port = runner.addresses[0][1]
    url = f"http://{args.http_host}:{port}/v1"
    await register(ctx, "draftwire-gateway", "OpenAI-compatible HTTP API over the NATS contract", [],
                   metadata={"http": url})
    ctx.ready_info["http"] = url
    log.info("OpenAI-compatible API at %s%s", url, " (API key required)" if args.api_key else "")


def main(argv: list[str] | None = None) -> None:
    run("gateway", build_parser(), start, argv)
