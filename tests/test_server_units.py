"""Server pieces without a server: the tool-call parser, request validation, the chat CLI."""

from __future__ import annotations

import argparse
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from loopcoder.cli import build_parser, main
from loopcoder.engine.engine import LLMEngine
from loopcoder.server.chat_cli import ChatSession
from loopcoder.server.loading import ProgressBar, default_model_name
from loopcoder.server.protocol import ChatCompletionRequest, CompletionRequest
from loopcoder.server.tool_calls import ToolCallParser, merge_deltas, parse_tool_calls
from server_fixtures import CONTENT, TOOL_ARGUMENTS, write_checkpoint

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
TWO_CALLS = (
    'Checking both.\n<tool_call>\n{"name": "a", "arguments": {"x": "}{\\"</tool_call>"}}\n</tool_call>\n'
    '<tool_call>{"name": "b\\u00e9", "arguments": [1, {"y": null}]}</tool_call>\n'
)
TEXTS = [
    CALL,
    "Let me look.\n\n" + CALL + "\n",
    TWO_CALLS,
    "no tools here, just <b>html</b> and <tool_ca",
    "broken <tool_call> not json </tool_call> then text  ",
    '<tool_call>{"arguments": {}, "name": "late"}</tool_call>',
    '<tool_call>\n{"name": "cut", "arguments": {"a": "unfinished',
    '<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>tail',
    "trailing spaces stay   ",
]


def streamed(text: str, cuts: list[int]) -> tuple[str, list[dict]]:
    parser, content, deltas, start = ToolCallParser(), "", [], 0
    for cut in [*sorted(set(cuts)), len(text)]:
        piece, more = parser.feed(text[start:cut])
        content, deltas, start = content + piece, deltas + more, cut
    piece, more = parser.finish()
    return content + piece, merge_deltas(deltas + more)


def without_ids(calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_parse_one_call():
    content, calls = parse_tool_calls("Let me look.\n\n" + CALL + "\n")
    assert content == "Let me look."
    assert without_ids(calls) == [("get_weather", TOOL_ARGUMENTS)]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_parse_two_calls_with_tricky_strings():
    content, calls = parse_tool_calls(TWO_CALLS)
    assert content == "Checking both."
    assert without_ids(calls) == [("a", '{"x": "}{\\"</tool_call>"}'), ("bé", '[1, {"y": null}]')]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": '}{"</tool_call>'}


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("no tools here, just <b>html</b> and <tool_ca", "no tools here, just <b>html</b> and <tool_ca"),
        ("broken <tool_call> not json </tool_call> then text  ", "broken<tool_call> not json </tool_call> then text  "),
        ('<tool_call>{"arguments": {}, "name": "late"}</tool_call>', '<tool_call>{"arguments": {}, "name": "late"}</tool_call>'),
    ],
)
def test_text_that_is_not_a_call_stays_content(text, content):
    assert parse_tool_calls(text) == (content, [])


def test_unfinished_call_keeps_its_partial_arguments():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "cut", "arguments": {"a": "unfinished')
    assert content == "" and without_ids(calls) == [("cut", '{"a": "unfinished')]


def test_every_cut_gives_the_same_result():
    for text in TEXTS:
        whole = parse_tool_calls(text)
        for cut in range(len(text) + 1):
            content, calls = streamed(text, [cut])
            assert (content, without_ids(calls)) == (whole[0], without_ids(whole[1])), (text, cut)
        one_by_one = streamed(text, list(range(len(text))))
        assert (one_by_one[0], without_ids(one_by_one[1])) == (whole[0], without_ids(whole[1]))


PIECES = ["a", " ", "\n", "<tool_call>", "</tool_call>", '{"name": "f", "arguments": ', '{"k": ', '"v"', "}", "<tool", "_call>", "\\", '"']


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=20),
    st.lists(st.integers(0, 200), max_size=8),
)
def test_random_text_and_cuts(pieces, cuts):
    text = "".join(pieces)
    whole = parse_tool_calls(text)
    content, calls = streamed(text, [c for c in cuts if c <= len(text)])
    assert (content, without_ids(calls)) == (whole[0], without_ids(whole[1]))


def test_name_is_streamed_before_arguments():
    parser = ToolCallParser()
    assert parser.feed('<tool_call>{"name": "f", "argu') == ("", [])
    content, deltas = parser.feed('ments": {"a"')
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", ""), (0, None, '{"a"')]
    assert deltas[0].to_openai()["function"] == {"name": "f", "arguments": ""}
    assert deltas[1].to_openai() == {"index": 0, "function": {"arguments": '{"a"'}}
    assert parser.called


# -- request validation -----------------------------------------------------------------------------


def test_completion_request_validation():
    ok = CompletionRequest(prompt=[[1, 2], [3]], n=2, best_of=2, stop="x", logit_bias={"5": -100})
    assert ok.max_tokens == 16 and not ok.include_usage
    for bad in ({"prompt": []}, {"prompt": "x", "best_of": 3}, {"prompt": "x", "temperature": float("nan")},
                {"prompt": "x", "logit_bias": {"5": 101}}, {"prompt": "x", "seed": 2**64}, {"prompt": "x", "n": 65}):
        with pytest.raises(ValidationError):
            CompletionRequest(**bad)


def test_chat_request_validation():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.messages[0].text() == "ab"
    with pytest.raises(ValidationError, match="top_logprobs"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_logprobs=3)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


# -- CLI --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--max-model-len" in capsys.readouterr().out


def test_serve_defaults():
    args = build_parser().parse_args(["serve", "some/ckpt"])
    assert (args.host, args.port, args.model_path, args.api_key) == ("127.0.0.1", 8000, "some/ckpt", None)
    assert default_model_name(None) == "loopcoder-demo"
    assert default_model_name("some/ckpt/") == "ckpt"


def test_progress_bar():
    out = io.StringIO()
    bar = ProgressBar("Loading x", out, width=4)
    for done in range(1, 5):
        bar(done, 4)
    assert out.getvalue().endswith("\rLoading x [####] 4/4 tensors\n")
    assert "\rLoading x [##..] 2/4 tensors" in out.getvalue()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    return LLMEngine(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "chat-model"), max_num_seqs=1)


def test_chat_session_streams_keeps_history_and_resets(engine):
    out = io.StringIO()
    args = argparse.Namespace(system="Be brief.", max_tokens=None, temperature=0.0, top_p=1.0, seed=None)
    session = ChatSession(engine, args, out)
    assert session.handle("What's the weather?")
    reply = out.getvalue().strip()
    assert reply.startswith(CONTENT + "<tool_call>") and reply.endswith("</tool_call>")
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    assert session.history[-1]["content"] == reply
    assert session.handle("And tomorrow?")
    assert len(session.history) == 5
    assert session.handle("/reset")
    assert session.history == [{"role": "system", "content": "Be brief."}]
    assert not session.handle("/exit")


def test_chat_session_refuses_an_overlong_history(engine, capsys):
    args = argparse.Namespace(system=None, max_tokens=4, temperature=0.0, top_p=1.0, seed=None)
    session = ChatSession(engine, args, io.StringIO())
    session.handle("x" * 2000)
    assert session.history == [] and "no longer fits" in capsys.readouterr().err


def test_chat_command_reads_stdin(monkeypatch, capsys, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/reset\n"))
    assert main(["chat", str(checkpoint), "--temperature", "0", "--max-tokens", "1"]) == 0
    captured = capsys.readouterr()
    assert CONTENT in captured.out and "(conversation cleared)" in captured.out
