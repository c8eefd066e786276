"""Tool calls in model output: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

LoopCoder's chat template asks for that format (Hermes/Qwen style). `ToolCallParser` reads the
output as it streams and splits it into content and OpenAI tool-call deltas; the non-streamed
response runs the same parser over the whole text, so streamed deltas always concatenate to
the non-streamed message. Its decisions depend only on the text, never on how it was cut:

- text that might still become ``<tool_call>`` is held back, and so is trailing whitespace
  (whitespace just before a tool call, or after one, is dropped; elsewhere it is kept);
- a tool call starts once its name is complete and its arguments have begun; the arguments
  are streamed verbatim, character for character, until their JSON value closes;
- a block whose start is not ``{"name": "...", "arguments": `` stays content, tag included.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NAME = object()
_HEADER = ("{", '"name"', ":", _NAME, ",", '"arguments"', ":")


@dataclass
class ToolCallDelta:
    """One piece of the `index`-th tool call: its start (id and name) or more argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        function: dict = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        delta: dict = {"index": self.index, "function": function}
        if self.id is not None:
            delta.update(id=self.id, type="function")
        return delta


class ToolCallParser:
    """Feed output text in pieces; get back content and tool-call deltas for each piece."""

    def __init__(self) -> None:
        self._buffer = ""
        self._state = self._content
        self._calls = 0
        self._after_call = False
        self._value: _JsonValue | None = None

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Everything held back, at the end of the output."""
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._state(content, deltas, final):
            pass
        return "".join(content), deltas

    def _content(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        if self._after_call:
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return False
            self._after_call = False
        at = self._buffer.find(OPEN)
        if at >= 0:
            content.append(self._buffer[:at].rstrip())
            self._buffer = self._buffer[at + len(OPEN) :]
            self._state = self._header
            return True
        if final:
            content.append(self._buffer)
            self._buffer = ""
            return False
        keep = _partial_tag(self._buffer)
        ready = self._buffer[: len(self._buffer) - keep]
        text = ready.rstrip()
        content.append(text)
        self._buffer = self._buffer[len(text) :]
        return False

    def _header(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        status, name, end = _match_header(self._buffer)
        if status == "partial" and not final:
            return False
        if status == "ok":
            deltas.append(ToolCallDelta(self._calls, f"call_{uuid.uuid4().hex[:24]}", name, ""))
            self._calls += 1
            self._buffer = self._buffer[end:]
            self._value = _JsonValue()
            self._state = self._arguments
            return True
        content.append(OPEN)
        self._state = self._content
        return True

    def _arguments(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        used = self._value.consume(self._buffer)
        if used:
            deltas.append(ToolCallDelta(self._calls - 1, arguments=self._buffer[:used]))
            self._buffer = self._buffer[used:]
        if not self._value.done:
            return False
        self._state = self._tail
        return True

    def _tail(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        at = self._buffer.find(CLOSE)
        if at < 0:
            self._buffer = self._buffer[-(len(CLOSE) - 1) :]
            return False
        self._buffer = self._buffer[at + len(CLOSE) :]
        self._after_call = True
        self._state = self._content
        return True


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of OPEN."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


def _match_header(text: str) -> tuple[str, str | None, int]:
    """("ok", name, end of header), ("partial", None, 0) while it may still match, or ("fail", ...)."""
    pos, name = 0, None
    for part in _HEADER:
        pos = _skip_space(text, pos)
        if pos == len(text):
            return "partial", None, 0
        if part is _NAME:
            match = _STRING.match(text, pos)
            if match is None:
                return ("partial" if text[pos] == '"' else "fail"), None, 0
            try:
                name = json.loads(match.group(0))
            except ValueError:
                return "fail", None, 0
            pos = match.end()
            continue
        piece = text[pos : pos + len(part)]
        if not part.startswith(piece):
            return "fail", None, 0
        if len(piece) < len(part):
            return "partial", None, 0
        pos += len(part)
    pos = _skip_space(text, pos)
    if pos == len(text):
        return "partial", None, 0
    return ("ok", name, pos) if text[pos] in '{["' else ("fail", None, 0)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


class _JsonValue:
    """Finds where a JSON object, array or string that starts a text ends, fed in pieces."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def consume(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them until it closes)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    self.done = self.depth == 0
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
            if self.done:
                return i + 1
        return len(text)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Content and complete OpenAI tool calls of a finished output."""
    parser = ToolCallParser()
    content, deltas = parser.feed(text)
    rest, more = parser.finish()
    return content + rest, merge_deltas(deltas + more)


def merge_deltas(deltas: list[ToolCallDelta]) -> list[dict]:
    calls: list[dict] = []
    for delta in deltas:
        if delta.id is not None:
            calls.append({"id": delta.id, "type": "function", "function": {"name": delta.name, "arguments": ""}})
        calls[delta.index]["function"]["arguments"] += delta.arguments
    return calls
