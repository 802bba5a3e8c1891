"""`fedem serve` through the official `openai` client, against a real uvicorn on 127.0.0.1."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from fedem import serve
from fedem.serve import CHAT_TEMPLATE, ChatMessage, _partial_stop, chat_prompt, create_serve_app

NAME = "tiny"


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under a real uvicorn on a free 127.0.0.1 port, in a daemon thread; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    with serving(create_serve_app(tiny_model_dir, model_name=NAME, max_context=64, max_queue=16)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_completion_greedy_is_deterministic_and_streams_the_same(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": NAME,
        "prompt": "English: hello\nHindi:",
        "max_tokens": 8,
        "temperature": 0,
    }
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert first.object == "text_completion"
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].finish_reason in ("stop", "length")
    usage = first.usage
    assert usage is not None and usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == first.choices[0].text
    assert chunks[-1].choices[0].finish_reason == first.choices[0].finish_reason


def test_chat_completion_plain_and_streamed(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    text = reply.choices[0].message.content
    assert isinstance(text, str)

    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_n_samples_with_seed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": NAME,
        "prompt": "The",
        "max_tokens": 6,
        "temperature": 1.0,
        "n": 2,
        "seed": 7,
    }
    first = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # same seed, same text


def test_stop_cuts_the_output(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": NAME,
        "prompt": "English: hello\nHindi:",
        "max_tokens": 8,
        "temperature": 0,
    }
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) >= 2
    stop = full[len(full) // 2 :][:2]  # a string that occurs in the greedy output
    cut = full[: full.find(stop)]
    reply = client.completions.create(**kwargs, stop=[stop])
    assert reply.choices[0].text == cut
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True))
    assert streamed == cut


def test_bad_requests_are_4xx_in_openai_shape(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="word " * 60, max_tokens=8)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", max_tokens=64)  # fits alone, not with the prompt
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=-1)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="hi", max_tokens=0)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", max_tokens=4, n=9)
    robot: Any = [{"role": "robot", "content": "hi"}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=robot)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    assert missing.value.code == "model_not_found"

    raw = httpx.post(f"{base_url}/v1/completions", json={"prompt": 3}, timeout=10)
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    broken = httpx.post(
        f"{base_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(f"{base_url}/v1/completions", content=b"x" * (2 << 20), timeout=10)
    assert big.status_code == 413


def test_concurrent_requests_all_succeed(client: openai.OpenAI) -> None:
    def one(i: int) -> str:
        kwargs: dict[str, Any] = {"model": NAME, "prompt": f"Number {i}", "max_tokens": 4, "temperature": 0}
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
        return client.completions.create(**kwargs).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert len(results) == 8
    assert results[0] == one(0)  # queued runs give the same greedy text as a lone one


def test_a_full_queue_answers_429(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One request runs, one waits (max_queue=1): a third one meanwhile is refused, not queued.

    The running generation is held at a gate until the third answer is in, so the test does not
    depend on how long a generation takes (it may hit EOS after a token); then all of it runs."""
    gate, started = threading.Event(), threading.Event()
    real_run_job = serve.run_job

    def gated_run_job(*args: Any) -> None:
        started.set()
        assert gate.wait(60)
        real_run_job(*args)

    monkeypatch.setattr(serve, "run_job", gated_run_job)
    body = {"prompt": "The", "max_tokens": 8, "temperature": 1.0, "seed": 1, "stream": True}
    app = create_serve_app(tiny_model_dir, max_queue=1)
    with serving(app) as url, ThreadPoolExecutor(2) as pool:

        def one() -> tuple[int, dict[str, Any] | None]:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                response.read()
                return response.status_code, response.json() if response.status_code != 200 else None

        running = pool.submit(one)
        assert started.wait(60)  # the first request is generating (held at the gate)
        waiting = pool.submit(one)
        deadline = time.monotonic() + 30
        while not app.state.served.queue.full():  # the second one is queued
            assert time.monotonic() < deadline, "the second request was never queued"
            time.sleep(0.02)
        code, error = one()
        gate.set()
        assert running.result()[0] == 200 and waiting.result()[0] == 200
    assert code == 429 and error is not None and error["error"]["code"] == "queue_full"


def test_chat_template_matches_the_documented_one(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello."),
        ChatMessage(role="user", content="Again"),
    ]
    prompt = chat_prompt(messages)
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Again\nAssistant:"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False)
    assert rendered == prompt


def test_partial_stop() -> None:
    assert _partial_stop("abc\nUs", "\nUser:") == 3
    assert _partial_stop("abc", "\nUser:") == 0
    assert _partial_stop("ab", "b") == 0  # a whole stop string is a match, not a partial one
