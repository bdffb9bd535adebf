"""The HTTP side of ``llmzoo serve``: OpenAI's API (``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health``) over an :class:`~llmzoo.serve.engine.Engine`, with FastAPI.

Requests are checked strictly (pydantic, strict types, unknown fields refused as OpenAI does); whatever is wrong
is an OpenAI-style error ``{"error": {"message", "type", "param", "code"}}`` with status 400 (401 for a missing or
wrong API key, 413 for a body over the size limit), and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmzoo.serve.engine import Engine, Sequence

DISCONNECT_POLL = 0.2  # seconds between checks that a non-streamed reply's client is still there


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class Sampling(StrictModel):
    """The fields both endpoints take. Accepted for compatibility, with their neutral value only:
    ``presence_penalty``, ``frequency_penalty`` (0), ``logprobs`` (null / false), ``user`` (any)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0, ge=0, le=0)
    frequency_penalty: float = Field(0, ge=0, le=0)

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: None = None
    echo: Literal[False] = False


class ContentPart(StrictModel):
    type: Literal["text"]
    text: str


class Message(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None


@dataclass
class ChatFormat:
    """How ``/v1/chat/completions`` turns messages into a prompt (the chat template, rendered in its sandbox, and
    tokenized) and where a reply ends: the tokens and the text that close the assistant's turn."""

    encode: Callable[[list[dict]], list[int]]
    end_ids: set[int]
    end_of_turn: str | None = None


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return APIError(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    return APIError(f"Invalid value for '{param}': {first['msg']}", param, "invalid_value")


def create_app(engine: Engine, tokenizer, model_name: str, chat: ChatFormat | None = None, api_key: str | None = None,
               max_tokens: int | None = None, max_request_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving ``engine``'s model under ``model_name``.

    ``chat``: how ``/v1/chat/completions`` renders messages (none: it answers 400); ``api_key``: the bearer token every ``/v1`` request must carry; ``max_tokens``: the
    most tokens one request may ask for (default: the context); ``max_request_bytes``: the largest body."""
    context = engine.context
    limit = min(max_tokens or context, context)
    created = int(time.time())

    def authorize(request: Request) -> None:  # a dependency of every route
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError("Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", status=401)

    app = FastAPI(title="llmzoo", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authorize)])
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # an unknown path, a wrong method
        return APIError(f"{request.method} {request.url.path}: {error.detail}", status=error.status_code).response()

    async def parse(request: Request, schema: type[StrictModel]):
        if int(request.headers.get("content-length") or 0) > max_request_bytes:
            raise APIError(f"request body over {max_request_bytes} bytes", code="request_too_large", status=413)
        body = await request.body()
        if len(body) > max_request_bytes:
            raise APIError(f"request body over {max_request_bytes} bytes", code="request_too_large", status=413)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(f"the body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError("the body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            raise validation_error(error) from None

    def sequences(body: Sampling, prompts: list[list[int]], requested: int | None, default: int | None,
                  stop: list[str], end_ids: set[int], queue: asyncio.Queue) -> list[Sequence]:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        if requested is not None and requested > limit:
            raise APIError(f"{param}={requested} is over this server's limit of {limit}", param, "invalid_value")
        rows, loop = [], asyncio.get_running_loop()
        for number, ids in enumerate(prompts):
            room = context - len(ids)
            wanted = requested or min(default or room, room, limit)
            if room < 1 or wanted > room:
                raise APIError(f"This model's maximum context length is {context} tokens. However, you requested "
                               f"{len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} for the completion). "
                               f"Please reduce the prompt or the completion length.", "messages"
                               if isinstance(body, ChatRequest) else "prompt", "context_length_exceeded")
            for j in range(body.n):
                index = number * body.n + j
                rows.append(Sequence(ids, wanted, queue, loop, index, body.temperature, body.top_p,
                                     None if body.seed is None else body.seed + index, stop, end_ids))
        return rows

    async def respond(request: Request, body: Sampling, rows: list[Sequence], kind: str):
        """Run the rows; the whole response, or a stream of server-sent events."""
        queue = rows[0].queue
        engine.submit(rows)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model_name}

        def usage():
            prompt = sum(len(ids) for ids in {id(r.prompt): r.prompt for r in rows}.values())
            completion = sum(r.completion_tokens for r in rows)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        async def events():
            """The rows' events until each is done (or their client has gone: the event "gone")."""
            left = len(rows)
            while left:
                index, event, payload = await queue.get()
                if event == "gone":
                    return
                if event == "error":
                    raise APIError(payload, type="server_error", status=500)
                left -= event == "done"
                yield index, event, payload

        def choice(index: int, text: str | None, reason: str | None, delta: bool) -> dict:
            if kind == "chat":
                content = {"role": "assistant", "content": text} if not delta else (
                    {"content": text} if text is not None else {})
                return {"index": index, "delta" if delta else "message": content, "logprobs": None,
                        "finish_reason": reason}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

        async def watch():  # a streamed response's client going away cancels the stream (Starlette); this one's:
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL)
            queue.put_nowait((None, "gone", None))

        if not body.stream:
            texts, watcher = [""] * len(rows), asyncio.ensure_future(watch())
            try:
                async for index, event, payload in events():
                    if event == "text":
                        texts[index] += payload
            finally:
                watcher.cancel()
                for r in rows:
                    r.cancel()  # a client gone before the end frees its rows
            return JSONResponse({**head, "choices": [choice(i, texts[i], rows[i].finish_reason, False)
                                                     for i in range(len(rows))], "usage": usage()})

        chunk_head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def sse(data) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            try:
                if kind == "chat":
                    for i in range(len(rows)):
                        yield sse({**chunk_head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]})
                try:
                    async for index, event, payload in events():
                        text, reason = (payload, None) if event == "text" else (None, payload)
                        yield sse({**chunk_head, "choices": [choice(index, text, reason, True)]})
                except APIError as error:
                    yield sse({"error": {"message": error.message, "type": error.type, "param": None, "code": None}})
                    return
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**chunk_head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                for r in rows:
                    r.cancel()  # the client went away (or the stream ended): the engine frees the rows

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError("prompt is an empty list", "prompt", "invalid_value")
        ids = [tokenizer.encode(text) or [tokenizer.eos_token_id] for text in prompts]  # as llmzoo generate
        rows = sequences(body, ids, body.max_tokens, 16, body.stop, {tokenizer.eos_token_id}, asyncio.Queue())
        return await respond(request, body, rows, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest)
        if chat is None:
            raise APIError("this server has no chat template", code="no_chat_template")
        try:
            ids = chat.encode([message.plain() for message in body.messages])
        except ValueError as error:  # what the template refuses
            raise APIError(str(error), "messages", "invalid_value") from None
        stop = [*body.stop, *([chat.end_of_turn] if chat.end_of_turn else [])]
        rows = sequences(body, [ids], body.max_completion_tokens or body.max_tokens, None, stop, chat.end_ids,
                         asyncio.Queue())
        return await respond(request, body, rows, "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmzoo", "context_length": context}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    return app
