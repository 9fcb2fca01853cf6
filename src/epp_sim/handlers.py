"""aiohttp handlers of one simulated pod: the vLLM OpenAI server's endpoints.

Owns request-to-engine plumbing: model/adapter resolution, building `SimRequest`s, waiting on
the runner's tickets, SSE streaming, LoRA load/unload, `/v1/models`, `/health` and `/metrics`.

Invariants: every response carries `x-sim-pod`; a request the client abandons (or that the
server drops on shutdown) is aborted in the engine exactly once and counted as `abort`;
streams end with `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import xxhash
from aiohttp import web

from epp_sim import openai_api as api
from epp_sim.domain import RequestTooLarge, SimRequest
from epp_sim.realtime import Ticket
from epp_sim.tokenizer import generated_text, text_token_ids, tokenize, tokenize_ids

if TYPE_CHECKING:
    from epp_sim.server import SimPod

__all__ = ["OpenAIHandlers"]

_PERMISSION: dict[str, Any] = {
    "object": "model_permission",
    "allow_create_engine": False,
    "allow_sampling": True,
    "allow_logprobs": True,
    "allow_search_indices": False,
    "allow_view": True,
    "allow_fine_tuning": False,
    "organization": "*",
    "group": None,
    "is_blocking": False,
}

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class OpenAIHandlers:
    """The HTTP endpoints of one `SimPod`."""

    def __init__(self, pod: SimPod) -> None:
        self.pod = pod
        self._created = int(time.time())

    def register(self, app: web.Application) -> None:
        """Add every route, the error middleware and the `x-sim-pod` header to `app`."""
        r = app.router
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_post("/tokenize", self.tokenize)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
        r.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        r.add_get("/metrics", self.metrics)
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_get("/load", self.load)
        r.add_get("/version", self.version)
        app.middlewares.append(self._errors)
        app.on_response_prepare.append(self._tag)

    async def _tag(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-sim-pod"] = self.pod.name

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except api.ApiError as e:
            return _json(e.body(), e.status)

    async def _body(self, request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            raise api.ApiError(400, f"Invalid JSON body: {e}") from None

    # -- inference ------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, api.parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, api.parse_chat)

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /tokenize``: ``prompt`` (a string) or ``messages`` (rendered through the
        chat template, with the generation prompt unless ``add_generation_prompt`` is false)."""
        self.pod.tokenize_received += 1
        body = await self._body(request)
        if not isinstance(body, dict):
            raise api.ApiError(400, "the body must be a JSON object.")
        self._resolve(body.get("model"))
        prompt, messages = body.get("prompt"), body.get("messages")
        if (prompt is None) == (messages is None):
            raise api.ApiError(400, "give either prompt or messages.")
        if messages is not None:
            text = api.parse_chat({"messages": messages}).prompts[0]
            assert isinstance(text, str)
            if body.get("add_generation_prompt", True) is False:
                text = text.removesuffix(api.GENERATION_PROMPT)
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise api.ApiError(400, "prompt must be a string.", "prompt")
        ids = text_token_ids(text) if text else []
        return _json({"count": len(ids), "max_model_len": self.pod.config.engine.max_model_len, "tokens": ids,
                      "token_strs": None})  # fmt: skip

    def _resolve(self, model: str | None) -> tuple[str, str | None]:
        served = self.pod.config.served_names
        if model is None or model in served:
            return model or served[0], None
        if model in self.pod.adapters and self.pod.config.engine.max_loras > 0:
            return model, model
        raise api.ApiError(404, f"The model `{model}` does not exist.", "model")

    def _build(self, parsed: api.ParsedRequest, adapter: str | None, received: float, rid: str) -> list[SimRequest]:
        cfg = self.pod.config
        block_size = cfg.engine.block_size
        reqs = []
        for i, raw in enumerate(parsed.prompts):
            if isinstance(raw, str):
                prompt = tokenize(raw, block_size, adapter, parsed.cache_salt)
            else:
                prompt = tokenize_ids(raw, block_size, adapter, parsed.cache_salt)
            max_tokens, stop = parsed.max_tokens, "length"
            if max_tokens is None:
                # No limit given: the "model" stops by itself after a length fixed by the prompt.
                room = max(1, cfg.engine.max_model_len - prompt.num_tokens)
                max_tokens = min(room, 16 + xxhash.xxh32_intdigest(repr(raw).encode(), cfg.seed) % 241)
                stop = "stop"
            seed = xxhash.xxh32_intdigest(f"{rid}-{i}".encode(), cfg.seed)
            reqs.append(SimRequest(f"{rid}-{i}", prompt, max_tokens, received, adapter, stop, seed, received))
        return reqs

    async def _generate(self, request: web.Request, parse: Callable[[Any], api.ParsedRequest]) -> web.StreamResponse:
        pod = self.pod
        received = pod.runner.clock()
        pod.note_request()
        parsed = parse(await self._body(request))
        model, adapter = self._resolve(parsed.model)
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        reqs = self._build(parsed, adapter, received, rid)
        # The engine may schedule it from now on; metrics still count from `received`.
        arrival = pod.runner.clock()
        for r in reqs:
            r.arrival = arrival
        try:
            ticket = pod.runner.submit(reqs)
        except RequestTooLarge as e:
            raise api.ApiError(400, str(e)) from None
        try:
            if parsed.stream:
                return await self._stream(request, parsed, ticket, model, rid)
            while not all(r.finished for r in reqs):
                await ticket.wait()
        finally:
            self._abandon(ticket)
        return _json(self._full_response(parsed, reqs, model, rid))

    def _abandon(self, ticket: Ticket) -> None:
        unfinished = [r for r in ticket.reqs if not r.finished]
        if unfinished:
            self.pod.runner.abort(ticket)
            for _ in unfinished:
                self.pod.metrics.observe_abort()

    @staticmethod
    def _usage(reqs: Sequence[SimRequest]) -> dict[str, Any]:
        return api.usage(
            sum(r.prompt.num_tokens for r in reqs),
            sum(r.num_output for r in reqs),
            sum(r.cached_tokens for r in reqs),
        )

    def _full_response(
        self, parsed: api.ParsedRequest, reqs: Sequence[SimRequest], model: str, rid: str
    ) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for i, r in enumerate(reqs):
            text = generated_text(r.text_seed, 0, r.num_output)
            choice: dict[str, Any] = {"index": i}
            if parsed.chat:
                choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
            else:
                choice["text"] = text
            choice.update(logprobs=None, finish_reason=r.finish_reason, stop_reason=None)
            choices.append(choice)
        return {
            "id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{rid}",
            "object": "chat.completion" if parsed.chat else "text_completion",
            "created": api.now_created(),
            "model": model,
            "choices": choices,
            "usage": self._usage(reqs),
            "prompt_logprobs": None,
        }

    async def _stream(
        self, request: web.Request, parsed: api.ParsedRequest, ticket: Ticket, model: str, rid: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        reqs = ticket.reqs
        chat = parsed.chat
        full_id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        created = api.now_created()
        sent = [0] * len(reqs)
        done = [False] * len(reqs)
        try:
            while not all(done):
                await ticket.wait()
                out = bytearray()
                for i, r in enumerate(reqs):
                    n = r.num_output
                    if done[i] or (n == sent[i] and not r.finished):
                        continue
                    text = generated_text(r.text_seed, sent[i], n)
                    finish = r.finish_reason if r.finished else None
                    if chat:
                        if sent[i] == 0:
                            role = {"role": "assistant", "content": ""}
                            first = api.chat_chunk(full_id, created, model, index=i, delta=role, finish=None)
                            out += b"data: " + orjson.dumps(first) + b"\n\n"
                        delta = {"content": text}
                        chunk = api.chat_chunk(full_id, created, model, index=i, delta=delta, finish=finish)
                    else:
                        chunk = api.completion_chunk(full_id, created, model, index=i, text=text, finish=finish)
                    out += b"data: " + orjson.dumps(chunk) + b"\n\n"
                    sent[i] = n
                    done[i] = r.finished
                if out:
                    await resp.write(bytes(out))
            tail = b""
            if parsed.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                final = {
                    "id": full_id,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": self._usage(reqs),
                }
                tail = b"data: " + orjson.dumps(final) + b"\n\n"
            await resp.write(tail + b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away; `_generate` aborts what is left
        return resp

    # -- management -----------------------------------------------------------------------------
    async def models(self, _request: web.Request) -> web.Response:
        cfg = self.pod.config
        base = cfg.served_names[0]

        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            permission = dict(
                _PERMISSION, id=f"modelperm-{xxhash.xxh64_hexdigest(name.encode())}", created=self._created
            )
            return {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": cfg.engine.max_model_len,
                "permission": [permission],
            }

        data = [card(name, cfg.model, None) for name in cfg.served_names]
        data += [card(name, path, base) for name, path in self.pod.adapters.items()]
        return _json({"object": "list", "data": data})

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise api.ApiError(400, "The request body must be a JSON object.")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise api.ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.pod.config.served_names:
            raise api.ApiError(400, f"The lora adapter '{name}' cannot have the same name as the base model.")
        if name in self.pod.adapters and not body.get("load_inplace", False):
            raise api.ApiError(400, f"The lora adapter '{name}' has already been loaded.")
        self.pod.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise api.ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        if self.pod.adapters.pop(name, None) is None:
            raise api.ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def metrics(self, request: web.Request) -> web.Response:
        names = request.query.getall("name[]", [])
        body, headers = self.pod.metrics.render(
            names, request.headers.get("Accept", ""), request.headers.get("Accept-Encoding", "")
        )
        return web.Response(body=body, headers=headers)

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def load(self, _request: web.Request) -> web.Response:
        engine = self.pod.engine
        return _json({"server_load": len(engine.waiting) + len(engine.running)})

    async def version(self, _request: web.Request) -> web.Response:
        return _json({"version": "0.33.0", "simulator": "epp-sim"})
