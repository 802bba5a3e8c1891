"""`fedem serve`: one checkpoint behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`, `POST /v1/chat/completions`
(streaming as server-sent events, `data: {...}` chunks and a final `data: [DONE]`), `GET /healthz`.

One model, one generation at a time. Requests wait in a FIFO queue (`max_queue` deep, 429 beyond) and
a single worker task runs them in arrival order, each in a worker thread, so the event loop keeps
answering while the model computes. A request's text reaches the client as it is produced: generation
pushes each decoded piece onto the request's own asyncio queue, the handler turns pieces into SSE chunks
(or, without `stream`, into one JSON answer). A streaming client that goes away stops its generation
at the next token, or has its request skipped if it is still queued.

Chat template (see `CHAT_TEMPLATE`; the tokenizer adds `<s>` itself): one line per message, then the
cue for the answer, in the same `Name: text` style as the translation prompts::

    System: You are terse.
    User: Say hello.
    Assistant: Hello.
    User: Again.
    Assistant:

Chat requests stop at the end-of-sequence token or when the model starts a new turn (`\\nUser:`,
`\\nSystem:`, `\\nAssistant:`), besides the request's own `stop` strings.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request
(including `context_length_exceeded` when prompt tokens + max_tokens > the context limit), 404 for an
unknown model, 413 for a body over 1 MiB, 429 when the queue is full.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from fedem import __version__
from fedem.generate import DecodingConfig, generation_config

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MAX_N = 8
MAX_STOP = 4
MAX_BODY_BYTES = 1 << 20
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256  # chat has no OpenAI default; capped by the context left
CHAT_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}

# The same template as `chat_prompt`, for `tokenizer.apply_chat_template` (set on the served tokenizer).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] in ['system', 'developer'] %}System{% elif m['role'] == 'user' %}User"
    "{% else %}Assistant{% endif %}: {{ m['content'] }}\n"
    "{% endfor %}Assistant:"
)


# --- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


# --- request schemas (OpenAI's; unknown fields are ignored) ---------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    # accepted only at their neutral values (anything else is refused, not silently ignored)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The prompt for a conversation (the module docstring shows the template)."""
    lines = [f"{ROLE_NAMES[m.role]}: {_message_text(m, i)}\n" for i, m in enumerate(messages)]
    return "".join(lines) + "Assistant:"


# --- generation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One choice to generate: prompt token ids, decoding settings, stop strings."""

    index: int
    prompt_ids: list[int]
    cfg: DecodingConfig
    stop: tuple[str, ...]


Event = tuple[
    str, Any
]  # ("delta", (index, text)) | ("done", (index, finish_reason, tokens)) | ("error", msg)


@dataclass
class Job:
    samples: list[Sample]
    emit: Callable[[Event], None]  # thread-safe: hands an event to the request's handler
    cancel: threading.Event = field(default_factory=threading.Event)


class _StopStreamer(BaseStreamer):
    """Decodes the new tokens as they come, emits text that cannot be part of a stop string, and flags
    a stop string or a cancelled job so that `_Stopper` ends generation at this token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sample: Sample, job: Job) -> None:
        self.tokenizer, self.sample, self.job = tokenizer, sample, job
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() hands over the prompt first
            self.seen_prompt = True
            return
        self.ids.extend(int(token) for token in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        cut = min((found for s in self.sample.stop if (found := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            ready = text.rstrip("\ufffd")  # an unfinished multi-byte character: wait for the rest
            # hold back a tail that may be the start of a stop string
            held = max((_partial_stop(ready, stop) for stop in self.sample.stop), default=0)
            end = len(ready) - held
        if end > self.sent:
            self.job.emit(("delta", (self.sample.index, text[self.sent : end])))
            self.sent = end


def _partial_stop(text: str, stop: str) -> int:
    """The length of the longest proper prefix of `stop` that `text` ends with (0 if none)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


class _Stopper(StoppingCriteria):
    def __init__(self, streamer: _StopStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = self.streamer.stopped or self.streamer.job.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def run_job(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, job: Job) -> None:
    """Generate every sample of a job in turn (in a worker thread), emitting events as it goes."""
    device = next(model.parameters()).device
    for sample in job.samples:
        if job.cancel.is_set():
            return
        streamer = _StopStreamer(tokenizer, sample, job)
        inputs = {
            "input_ids": torch.tensor([sample.prompt_ids], device=device),
            "attention_mask": torch.ones((1, len(sample.prompt_ids)), dtype=torch.long, device=device),
        }
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sample.cfg.seed)
            output = _generate(model, inputs, generation_config(sample.cfg, tokenizer), streamer)
        new = output[0, len(sample.prompt_ids) :].tolist()
        ended_on_eos = bool(new) and new[-1] == tokenizer.eos_token_id
        finish = "stop" if streamer.stopped or ended_on_eos else "length"
        job.emit(("done", (sample.index, finish, len(new))))


def _generate(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], config: GenerationConfig, streamer: _StopStreamer
) -> torch.Tensor:
    """`model.generate` with the stop-string/cancel criteria (see `fedem.generate.generate_ids`)."""
    generator: Any = model
    output = generator.generate(
        **inputs,
        generation_config=config,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Stopper(streamer)]),
    )
    return cast(torch.Tensor, output)


# --- the app --------------------------------------------------------------------------------------


@dataclass
class _Served:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    created: int
    max_context: int
    queue: "asyncio.Queue[Job]"


def create_serve_app(
    model_dir: Path,
    adapter: Path | None = None,
    model_name: str | None = None,
    max_context: int = 2048,
    max_queue: int = 32,
) -> FastAPI:
    """The OpenAI-compatible app for one checkpoint (loaded now, once; an adapter is merged in)."""
    from fedem.generate import load_for_inference

    model, tokenizer = load_for_inference(model_dir, adapter)
    tokenizer.chat_template = CHAT_TEMPLATE
    name = model_name or (f"{model_dir.name}+{adapter.name}" if adapter is not None else model_dir.name)
    served = _Served(model, tokenizer, name, int(time.time()), max_context, asyncio.Queue(maxsize=max_queue))

    async def worker() -> None:
        while True:
            job = await served.queue.get()
            try:
                if not job.cancel.is_set():
                    await run_in_threadpool(run_job, served.model, served.tokenizer, job)
            except Exception as err:  # one failed request must not stop the worker
                log.exception("generation failed")
                job.emit(("error", f"generation failed: {type(err).__name__}: {err}"))
            finally:
                job.emit(("end", None))
                served.queue.task_done()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(worker())
        yield
        task.cancel()

    app = FastAPI(title="fedem serve", version=__version__, lifespan=lifespan)
    app.state.served = served

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Any]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error_response(APIError(413, f"request body over {MAX_BODY_BYTES} bytes"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _error_response(APIError(400, message, param=param))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        parameters = sum(p.numel() for p in served.model.parameters())
        return {
            "status": "ok",
            "model": served.name,
            "parameters": parameters,
            "queued": served.queue.qsize(),
        }

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "fedem"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        if model_id != served.name:
            raise APIError(
                404,
                f"model {model_id!r} not found; this server has {served.name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _refuse_unsupported(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return await _serve(served, body, prompts, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        _refuse_unsupported(body)
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        prompt = chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _serve(served, body, [prompt], max_tokens, CHAT_DEFAULT_MAX_TOKENS, chat=True)

    return app


def _refuse_unsupported(body: _Request) -> None:
    for param in ("presence_penalty", "frequency_penalty"):
        if getattr(body, param) not in (None, 0, 0.0):
            raise APIError(400, f"{param} is not supported (only 0)", param=param)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs")


def _decoding(body: _Request, max_tokens: int, seed: int) -> DecodingConfig:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if temperature == 0:
        return DecodingConfig(strategy="greedy", max_new_tokens=max_tokens)
    return DecodingConfig(
        strategy="sample", top_k=0, top_p=top_p, temperature=temperature, max_new_tokens=max_tokens, seed=seed
    )


def _check_params(body: _Request, max_tokens: int | None) -> tuple[int, list[str]]:
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise APIError(400, "temperature must be between 0 and 2", param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise APIError(400, "top_p must be > 0 and ≤ 1", param="top_p")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    if body.seed is not None and body.seed < 0:
        raise APIError(400, "seed must be ≥ 0", param="seed")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    return n, stops


async def _serve(
    served: _Served,
    body: _Request,
    prompts: list[str],
    max_tokens: int | None,
    default_max_tokens: int,
    chat: bool,
) -> Any:
    if body.model is not None and body.model != served.name:
        raise APIError(
            404,
            f"model {body.model!r} not found; this server has {served.name!r}",
            param="model",
            code="model_not_found",
        )
    n, stops = _check_params(body, max_tokens)
    if chat:
        stops += [s for s in CHAT_STOPS if s not in stops]

    def encode() -> list[list[int]]:
        return [list(served.tokenizer(p)["input_ids"]) for p in prompts]

    encoded = await run_in_threadpool(encode)
    longest = max(len(ids) for ids in encoded)
    left = served.max_context - longest
    if max_tokens is None:
        max_tokens = min(default_max_tokens, left)
    if left < 1 or longest + max_tokens > served.max_context:
        raise APIError(
            400,
            f"this model's context is {served.max_context} tokens; the request asks for {longest} prompt "
            f"tokens + {max_tokens} max_tokens = {longest + max_tokens}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    seed = body.seed if body.seed is not None else secrets.randbelow(1 << 31)
    samples = [
        Sample(p * n + i, ids, _decoding(body, max_tokens, seed + i), tuple(stops))
        for p, ids in enumerate(encoded)
        for i in range(n)
    ]
    prompt_tokens = sum(len(ids) for ids in encoded)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(samples, emit)
    try:
        served.queue.put_nowait(job)
    except asyncio.QueueFull:
        raise APIError(
            429,
            "the server is busy: too many queued requests, retry later",
            kind="rate_limit_error",
            code="queue_full",
        ) from None

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        chunks = _stream(served, job, events, rid, created, chat, len(samples), prompt_tokens, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    try:
        texts = [""] * len(samples)
        finish: list[str | None] = [None] * len(samples)
        completion_tokens = 0
        while True:
            kind, data = await events.get()
            if kind == "delta":
                texts[data[0]] += data[1]
            elif kind == "done":
                finish[data[0]] = data[1]
                completion_tokens += data[2]
            elif kind == "error":
                raise APIError(500, data, kind="server_error")
            else:
                break
    finally:
        job.cancel.set()  # a no-op once finished; stops the generation if this handler was cancelled
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish[i],
                "logprobs": None,
            }
            for i, text in enumerate(texts)
        ]
        obj = "chat.completion"
    else:
        choices = [
            {"index": i, "text": text, "finish_reason": finish[i], "logprobs": None}
            for i, text in enumerate(texts)
        ]
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": served.name,
        "choices": choices,
        "usage": usage,
    }


async def _stream(
    served: _Served,
    job: Job,
    events: "asyncio.Queue[Event]",
    rid: str,
    created: int,
    chat: bool,
    count: int,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": rid, "object": obj, "created": created, "model": served.name, "choices": choices}
        return f"data: {json.dumps({**payload, **extra}, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if not chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta: dict[str, Any] = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    completion_tokens = 0
    try:
        if chat:
            for i in range(count):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ]
                )
        while True:
            kind, data = await events.get()
            if kind == "delta":
                yield chunk([choice(data[0], data[1], None)])
            elif kind == "done":
                completion_tokens += data[2]
                yield chunk([choice(data[0], None if chat else "", data[1])])
            elif kind == "error":
                yield f"data: {json.dumps(APIError(500, data, kind='server_error').body())}\n\n"
                return
            else:
                break
        if include_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # the client left (or we are done): stop generating for it
