"""The OpenAI-compatible server end to end: a real `loopcoder serve` subprocess driven by the
official `openai` client (and raw HTTP where the client hides the wire format).

The checkpoint is the bigram machine of `server_fixtures`, so greedy outputs are known
exactly: after a chat prompt it announces and emits a `get_weather` tool call, after a FIM
prompt it writes `return a + b`, and elsewhere it follows a fixed successor table.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import tokenizers

from loopcoder.tokenizer import Tokenizer, load_tokenizer
from server_fixtures import (
    CONTENT,
    FIM_MIDDLE,
    MARGIN,
    TOOL_ARGUMENTS,
    ServerProcess,
    greedy_ids,
    write_checkpoint,
)

API_KEY = "test-secret"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
USER = [{"role": "user", "content": "What's the weather in Paris?"}]
# A request that shows the server still answers after a bad one: greedy, never ended by an eos.
STILL_SERVING = {"max_tokens": 2, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bigram")


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """Both servers start at once (startup is mostly imports); stopped at the end."""
    logs = tmp_path_factory.mktemp("logs")
    main = ServerProcess(checkpoint, logs / "main.log", "--max-num-seqs", "32", "--log-level", "warning")
    limited = ServerProcess(
        checkpoint, logs / "limited.log", "--api-key", API_KEY, "--served-model-name", "limited",
        "--max-num-seqs", "1", "--max-waiting", "1", "--log-level", "warning",
    )
    try:
        yield main.wait_ready(), limited.wait_ready()
    finally:
        main.stop()
        limited.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers[0]


@pytest.fixture(scope="module")
def limited(servers) -> ServerProcess:
    return servers[1]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(checkpoint) -> Tokenizer:
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def raw_tok(checkpoint) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


MODEL = "tiny-bigram"


def expected_text(tok: Tokenizer, raw_tok, prompt_ids: list[int], count: int) -> str:
    return tok.decode(greedy_ids(raw_tok, prompt_ids[-1], count), skip_special_tokens=True)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


# -- models, health, tokenize ------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_tokenize_detokenize(server, tok):
    body = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world"}).json()
    assert body["tokens"] == tok.encode("hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": "hello world"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": USER}).json()
    text = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)


# -- completions -------------------------------------------------------------------------------


def test_completion_greedy_follows_the_model(client, tok, raw_tok):
    prompt = tok.encode("The quick brown fox")
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_text(tok, raw_tok, prompt, 12)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(prompt), 12, len(prompt) + 12)
    by_text = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert by_text.choices[0].text == out.choices[0].text


def test_completion_prompt_forms_and_n(client, tok, raw_tok):
    prompts = [tok.encode("hello"), tok.encode("Paris today")]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert c.text == expected_text(tok, raw_tok, prompts[c.index // 2], 5)
    texts = client.completions.create(model=MODEL, prompt=["hello", "Paris today"], max_tokens=5, temperature=0)
    assert [c.text for c in texts.choices] == [out.choices[0].text, out.choices[2].text]
    assert texts.usage.prompt_tokens == sum(map(len, prompts))


def test_fim_via_suffix(client):
    out = client.completions.create(
        model=MODEL, prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n", max_tokens=20, temperature=0
    )
    assert out.choices[0].text == FIM_MIDDLE
    assert out.choices[0].finish_reason == "stop"


def test_echo_and_logprobs(client, tok, raw_tok):
    prompt = "for i in"
    ids = tok.encode(prompt)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == prompt + expected_text(tok, raw_tok, ids, 4)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None
    vocab = raw_tok.get_vocab_size(with_added_tokens=True)
    greedy = MARGIN - math.log(math.exp(MARGIN) + vocab - 1)  # the bigram machine's exact logprob
    assert all(abs(v - greedy) < 1e-3 for v in lp.token_logprobs[len(ids) :])
    assert all(len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]


def test_stop_conditions(client, tok):
    chat_prompt = tok.encode(tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    eos = client.completions.create(model=MODEL, prompt=chat_prompt, max_tokens=50, temperature=0)
    assert eos.choices[0].finish_reason == "stop" and eos.choices[0].text.startswith(CONTENT)
    by_str = client.completions.create(model=MODEL, prompt=chat_prompt, max_tokens=50, temperature=0, stop=["Paris"])
    assert by_str.choices[0].text == eos.choices[0].text.split("Paris")[0]
    assert by_str.choices[0].stop_reason == "Paris"
    kept = client.completions.create(
        model=MODEL, prompt=chat_prompt, max_tokens=50, temperature=0, stop="Paris",
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].text == by_str.choices[0].text + "Paris"
    close_id = tok.token_to_id("</tool_call>")
    by_id = client.completions.create(
        model=MODEL, prompt=chat_prompt, max_tokens=50, temperature=0, extra_body={"stop_token_ids": [close_id]}
    )
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].stop_reason == close_id
    ignored = client.completions.create(
        model=MODEL, prompt=chat_prompt, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 30


def test_sampling_parameters_reach_the_engine(client):
    def run(**kw) -> str:
        return client.completions.create(model=MODEL, prompt="hello world", max_tokens=24, **kw).choices[0].text

    greedy = run(temperature=0)
    seeded = run(temperature=1.0, seed=7)
    assert seeded == run(temperature=1.0, seed=7)
    assert any(run(temperature=1.0, seed=s) != seeded for s in (8, 9, 10))
    assert seeded != greedy
    # Each filter alone leaves only the top token, so sampling becomes greedy.
    assert run(temperature=1.0, seed=7, top_p=0.5) == greedy
    assert run(temperature=1.0, seed=7, extra_body={"top_k": 1}) == greedy
    assert run(temperature=1.0, seed=7, extra_body={"min_p": 1.0}) == greedy
    assert run(temperature=0, extra_body={"repetition_penalty": 1.2, "min_tokens": 4}) == greedy
    assert run(temperature=0, presence_penalty=2, frequency_penalty=2) != greedy  # repeats get pushed down


def collect_completion_stream(stream) -> tuple[dict[int, str], dict[int, int], dict[int, list], object]:
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    logprobs: dict[int, list] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finishes[c.index] = finishes.get(c.index, 0) + (c.finish_reason is not None)
            if c.logprobs is not None:
                logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
    return texts, finishes, logprobs, usage


@pytest.mark.parametrize(
    "params",
    [
        {"prompt": "hello world", "max_tokens": 20},
        {"prompt": ["hello", "quick brown"], "max_tokens": 9, "n": 2, "seed": 3, "temperature": 1.0},
        {"prompt": "for i in", "max_tokens": 6, "echo": True, "logprobs": 1},
        {"prompt": "def add(a, b):\n    ", "suffix": "\n", "max_tokens": 20},
        {"prompt": "hello world", "max_tokens": 30, "stop": ["dog", "Hello"]},
    ],
    ids=["plain", "n-seed", "echo-logprobs", "fim", "stop"],
)
def test_completion_stream_matches_non_stream(client, params):
    params = {"temperature": 0, **params}
    full = client.completions.create(model=MODEL, **params)
    stream = client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **params)
    texts, finishes, logprobs, usage = collect_completion_stream(stream)
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: 1 for c in full.choices}
    if params.get("logprobs") is not None:
        assert logprobs == {c.index: c.logprobs.token_logprobs for c in full.choices}
    assert usage == full.usage


@pytest.mark.parametrize(
    ("path", "body", "object_"),
    [
        ("/v1/completions", {"prompt": "hello"}, "text_completion"),
        ("/v1/chat/completions", {"messages": USER}, "chat.completion.chunk"),
    ],
)
def test_stream_wire_format(server, path, body, object_):
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert all(json.loads(e)["object"] == object_ for e in events[:-1])


# -- chat --------------------------------------------------------------------------------------


def test_chat_tool_call(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == CONTENT
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert call.function.arguments == TOOL_ARGUMENTS
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}


def test_chat_tool_call_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0, stream=True)
    content, calls, finishes, roles, argument_deltas = "", {}, [], 0, 0
    for chunk in stream:
        for c in chunk.choices:
            roles += c.delta.role == "assistant"
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
                argument_deltas += bool(d.function.arguments)
            if c.finish_reason is not None:
                finishes.append(c.finish_reason)
    assert roles == 1 and finishes == ["tool_calls"]
    assert content == CONTENT
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", TOOL_ARGUMENTS)]
    assert argument_deltas > 1  # arguments arrive as they are generated


def test_chat_without_tools_returns_the_raw_text(client):
    plain = client.chat.completions.create(model=MODEL, messages=USER, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.tool_calls is None
    text = plain.choices[0].message.content
    assert text.startswith(CONTENT + "<tool_call>") and text.endswith("</tool_call>")
    none = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="none", temperature=0)
    assert none.choices[0].message.content == text and none.choices[0].message.tool_calls is None


def test_chat_history_with_tool_results(client, tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}]},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=40)
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"
    template_messages = [{**m, "content": m["content"] or ""} for m in messages[:-1]]
    template_messages.append({"role": "user", "content": "And tomorrow?"})
    rendered = tok.apply_chat_template(template_messages, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in rendered
    assert out.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))


@pytest.mark.parametrize(
    "params",
    [
        {"tools": [WEATHER_TOOL], "logprobs": True, "top_logprobs": 3},
        {"n": 2, "seed": 11, "temperature": 1.0, "max_tokens": 12},
        {"max_tokens": 8, "stop": ["weather"]},
    ],
    ids=["tools-logprobs", "n-seed", "stop"],
)
def test_chat_stream_matches_non_stream(client, params):
    params = {"temperature": 0, **params}
    full = client.chat.completions.create(model=MODEL, messages=USER, **params)
    stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}, **params)
    content: dict[int, str] = {}
    finishes: dict[int, list] = {}
    logprobs: dict[int, list] = {}
    args: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                finishes.setdefault(c.index, []).append(c.finish_reason)
            if c.logprobs is not None:
                logprobs.setdefault(c.index, []).extend((t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in c.logprobs.content)
            for d in c.delta.tool_calls or []:
                args[c.index] = args.get(c.index, "") + (d.function.arguments or "")
    for c in full.choices:
        assert content[c.index] == (c.message.content or "")
        assert finishes[c.index] == [c.finish_reason]
        if c.message.tool_calls:
            assert args[c.index] == "".join(t.function.arguments for t in c.message.tool_calls)
        if params.get("logprobs"):
            expected = [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in c.logprobs.content]
            assert logprobs[c.index] == expected
            assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
    assert usage == full.usage


def test_chat_unsupported_options_are_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="required")
    assert e.value.body["param"] == "tool_choice"
    ok = client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "text"}, max_tokens=3)
    assert ok.choices[0].finish_reason == "length"


# -- bad input -----------------------------------------------------------------------------------


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"100000": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [100000], "min_tokens": 2}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**40}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 8}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2], "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": [7] * 1100}, 400, "prompt"),
    ("/v1/completions", {"prompt": [7] * 1000, "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2, "logprobs": True, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER, "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_names_the_field(server, client, path, body, status, param):
    response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert client.completions.create(model=MODEL, prompt="hi", **STILL_SERVING).choices[0].text


@pytest.mark.parametrize("raw", [b'{"prompt": "hi",', b"[1, 2]", b"null", b"\xff\xfe"])
def test_malformed_json(server, client, raw):
    response = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt="hi", **STILL_SERVING).choices[0].text


@pytest.mark.parametrize(
    ("path", "raw", "status"),
    [
        ("/v1/completions", rb'{"prompt": "\ud800"}', 400),
        ("/v1/completions", rb'{"prompt": "hi", "model": "\ud800"}', 404),
        ("/v1/completions", rb'{"prompt": "hi", "logit_bias": {"\ud800": 1}}', 400),
        ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\udfff"}]}', 400),
        ("/tokenize", rb'{"prompt": "\ud800"}', 400),
    ],
)
def test_lone_surrogates(server, client, path, raw, status):
    response = httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status and response.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="hi", **STILL_SERVING).choices[0].text


def test_unknown_route_is_an_openai_error(server):
    response = httpx.get(f"{server.url}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"]


# -- load, disconnects ------------------------------------------------------------------------------


def test_concurrent_streams_equal_sequential(server, client):
    prompts = [[5, 100 + i, 200 + i] for i in range(16)]
    sequential = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text for p in prompts]

    async def one(aclient: openai.AsyncOpenAI, prompt: list[int]) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(all_at_once()) == sequential


def wait_for(condition, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


def test_disconnect_aborts_and_frees_blocks(server):
    url = server.url
    assert wait_for(lambda: metric(url, "loopcoder:kv_cache_used_blocks") == 0) < 5
    aborts = metric(url, "loopcoder:request_success_total", '{finished_reason="abort"}')
    tokens = metric(url, "loopcoder:generation_tokens_total")
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(url, "loopcoder:kv_cache_used_blocks") > 0
        assert metric(url, "loopcoder:num_requests_running") == 1
    # Leaving the block closed the connection mid-stream.
    assert wait_for(lambda: metric(url, "loopcoder:kv_cache_used_blocks") == 0) < 2
    assert metric(url, "loopcoder:num_requests_running") == 0
    assert metric(url, "loopcoder:request_success_total", '{finished_reason="abort"}') == aborts + 1
    assert metric(url, "loopcoder:generation_tokens_total") - tokens < 900


def test_metrics_exposition(server, client):
    client.completions.create(model=MODEL, prompt="hello world", max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total",
        "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "kv_cache_usage_perc",
        "prefix_cache_hit_rate", "prefix_cache_queries_total",
    ):
        assert f"loopcoder:{name}" in text
    assert metric(server.url, "loopcoder:prefix_cache_hits_total") > 0  # the same chat prompt came many times


# -- auth, queue bound, drain (the limited server) -------------------------------------------------------


def test_api_key(limited):
    url = limited.url
    for path, method in [("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, f"{url}{path}", json={}, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == ["limited"]
    assert good.completions.create(model="limited", prompt="hi", **STILL_SERVING).choices[0].text


def test_full_queue_answers_503(limited):
    url, headers = limited.url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "limited", "prompt": "hello", "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
    queued: dict = {}

    def second() -> None:  # waits behind the first (max-num-seqs 1), then is dropped
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as r:
                queued["status"] = r.status_code
        except httpx.HTTPError as e:
            queued["error"] = e

    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as first:
        lines = first.iter_lines()  # keep a reference: a dropped iterator closes the connection
        next(lines)
        thread = threading.Thread(target=second)
        thread.start()
        wait_for(lambda: metric(url, "loopcoder:num_requests_waiting") == 1)
        refused = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_overloaded"
    thread.join(timeout=30)
    assert queued.get("status") == 200
    good = {"model": "limited", "prompt": "hello", "max_tokens": 3}
    wait_for(lambda: httpx.post(f"{url}/v1/completions", json=good, headers=headers).status_code == 200, timeout=10)


def test_sigterm_drains_running_requests(limited):
    url, headers = limited.url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "limited", "prompt": "hello", "max_tokens": 150, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        limited.process.send_signal(signal.SIGTERM)
        events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert finishes == ["length"]
    # uvicorn re-raises the signal once it has shut down, so the exit reads as "terminated by SIGTERM".
    assert limited.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Traceback" not in limited.log.read_text()
