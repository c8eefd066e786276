"""Tokenizers for LoopCoder checkpoints: encoding, decoding, chat templates, FIM, streaming.

The released IQuest checkpoints ship a SentencePiece ``tokenizer.model`` with a custom slow
Hugging Face tokenizer class; Hugging Face and vLLM users get that class's output, quirks
included, so `SentencePieceTokenizer` reproduces it exactly. Checkpoints with a
``tokenizer.json`` run on the ``tokenizers`` library, as transformers' fast tokenizers do.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import sentencepiece as spm
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
# transformers' order of special tokens (`all_special_tokens`), which decides new token ids.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory.

    ``tokenizer.json`` wins over ``tokenizer.model`` unless the config says ``use_fast: false``,
    as with transformers' AutoTokenizer.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    config_file = path / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    else:
        template = _default_template(config.get("chat_template"))
    json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
    if model_file.is_file() and (config.get("use_fast") is False or not json_file.is_file()):
        return SentencePieceTokenizer(model_file, config, template)
    if json_file.is_file():
        return JsonTokenizer(json_file, config, template)
    raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _default_template(template: str | list[dict[str, str]] | None) -> str | None:
    """Configs may hold several named templates; transformers uses the one named "default"."""
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}.get("default")
    return template


def _content(token: str | dict[str, Any] | None) -> str | None:
    """Config token entries are plain strings or serialized AddedToken dicts."""
    return token["content"] if isinstance(token, dict) else token


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`, applied when the config asks for it."""
    for pattern, replacement in _CLEAN_UP:
        text = text.replace(pattern, replacement)
    return text


_CLEAN_UP = [(" " + s, s) for s in (".", "?", "!", ",")] + [(" ' ", "'")] + [(" " + s, s) for s in ("n't", "'m", "'s", "'ve", "'re")]


class _Role(enum.Enum):
    """How a token takes part in decoding (see `SentencePieceTokenizer`)."""

    SKIP = enum.auto()  # dropped by skip_special_tokens
    PIECE = enum.auto()  # ordinary vocabulary piece
    MARK = enum.auto()  # special token inside a run of pieces
    LITERAL = enum.auto()  # added token that splits runs; joined to its neighbours by spaces


class Tokenizer(ABC):
    """What the engine, server and CLI use: encoding, decoding, chat templates, FIM prompts."""

    _defaults: dict[str, Any] = {}

    def __init__(self, config: dict[str, Any], chat_template: str | None) -> None:
        self._config = config
        self._chat_template = chat_template
        self.special_tokens_map: dict[str, str | list[str]] = {}
        for name in _NAMED_SPECIAL_TOKENS:
            if value := _content(self._setting(name)):
                self.special_tokens_map[name] = value
        if additional := [_content(t) for t in config.get("additional_special_tokens") or []]:
            self.special_tokens_map["additional_special_tokens"] = additional
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    def _setting(self, key: str) -> Any:
        return self._config.get(key, self._defaults.get(key))

    @property
    def special_tokens(self) -> list[str]:
        """Named special tokens (bos, eos, ..., additional), unique, in transformers' order."""
        tokens = [v for k, v in self.special_tokens_map.items() if k != "additional_special_tokens"]
        tokens += self.special_tokens_map.get("additional_special_tokens", [])
        return list(dict.fromkeys(tokens))

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds BOS/EOS only where the config asks."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, exactly as the checkpoint's Hugging Face tokenizer decodes it."""

    @abstractmethod
    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary strings of `ids`."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string, None when it is not in the vocabulary."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of tokens, added ones included (Hugging Face's `len(tokenizer)`)."""

    @property
    @abstractmethod
    def all_special_ids(self) -> list[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""

    @abstractmethod
    def _role(self, token_id: int, skip_special_tokens: bool) -> tuple[_Role, str]:
        """The token's part in decoding and its string (used by IncrementalDetokenizer)."""

    @abstractmethod
    def _decode_run(self, ids: list[int]) -> str:
        """Decode a run of PIECE tokens."""

    def _clean(self, text: str) -> str:
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render the chat template like transformers; ids are `encode(text, False)`."""
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        rendered = _compile_template(self._chat_template).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_kwargs},
        )
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """Prefix-suffix-middle prompt: the model writes the middle after it."""
        missing = [t for t in FIM_TOKENS if self.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer has no fill-in-the-middle tokens {missing}")
        fim_prefix, fim_suffix, fim_middle = FIM_TOKENS
        return f"{fim_prefix}{prefix}{fim_suffix}{suffix}{fim_middle}"


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """A sandboxed environment with the globals and filters transformers gives templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Unlike Jinja's own filter, no HTML escaping: prompts must show `<`, `&` and `'` as is."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@dataclass(frozen=True)
class _AddedToken:
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False

    @classmethod
    def from_config(cls, entry: dict[str, Any]) -> _AddedToken:
        return cls(
            entry["content"],
            **{k: bool(entry[k]) for k in ("special", "lstrip", "rstrip", "single_word", "normalized") if k in entry},
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``tokenizer.model``, behaving exactly like the release's slow class.

    What that class (transformers' slow-tokenizer machinery) does:
    - Encoding splits the text on added tokens first and encodes each piece on its own, so text
      after an added token gets SentencePiece's dummy-prefix ``▁``. ``single_word`` tokens only
      match between spaces (``x</s>y`` is plain text), and the split text ``"<s></s>"`` glues
      back into plain text, as transformers' loop does.
    - Named special tokens missing from the vocabulary (``<|CLS|>``...) get new ids after it.
    - Decoding cuts the ids into runs at "legacy" added tokens (added tokens that are not named
      specials, plus named specials beyond the SentencePiece vocabulary: ``<|im_end|>``,
      ``<tool_call>``, ``</s>``), decodes each run with SentencePiece (dropping its dummy-prefix
      space) and joins runs and legacy tokens with one space; empty runs are dropped except the
      last. Specials inside a run (``<s>``, ``<unk>``) put a space before the text preceding
      them: ``[x, <s>, z]`` decodes to ``" x<s>z"``.
    - skip_special_tokens drops named specials only: ``<think>`` (listed in
      ``additional_special_tokens``) goes, ``</s>`` and ``<tool_call>`` stay.
    """

    _defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}

    def __init__(self, model_file: Path, config: dict[str, Any], chat_template: str | None):
        super().__init__(config, chat_template)
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.add_bos_token = bool(self._setting("add_bos_token"))
        self.add_eos_token = bool(self._setting("add_eos_token"))
        self._added = {int(i): _AddedToken.from_config(entry) for i, entry in config.get("added_tokens_decoder", {}).items()}
        self._vocab_size = self._add_missing_special_tokens()
        self._ids = {t.content: i for i, t in self._added.items()}
        self._special = set(self.special_tokens)
        additional = self.special_tokens_map.get("additional_special_tokens", [])
        self._legacy = (set(self._ids) - self._special) | {t for t in additional if self._ids[t] >= self._sp.get_piece_size()}
        by_length = sorted(self._ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None

    def _add_missing_special_tokens(self) -> int:
        """Give named specials missing from the vocabulary the next free ids, as transformers
        does; return the vocabulary size."""
        size = self._sp.get_piece_size()
        vocab = {self._token(i): i for i in range(size)}
        vocab.update({t.content: i for i, t in self._added.items()})
        known = {t.content for t in self._added.values()}
        for token in self.special_tokens:
            if token not in known:
                self._added[vocab.setdefault(token, len(vocab))] = _AddedToken(token)
        return len(vocab)

    def _token(self, token_id: int) -> str:
        if token_id in self._added:
            return self._added[token_id].content
        if not 0 <= token_id < self._sp.get_piece_size():
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        return self._sp.id_to_piece(token_id)

    def _split(self, text: str) -> list[str]:
        """Split on added tokens, then apply their strip/single-word flags like transformers."""
        parts = [p for p in (self._split_re.split(text) if self._split_re else [text]) if p]
        for i, part in enumerate(parts):
            if part not in self._ids:
                continue
            token = self._added[self._ids[part]]
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if token.rstrip and right:
                parts[i + 1] = right.lstrip()
            if token.lstrip and left:
                parts[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif token.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        return parts

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for part in self._split(text):
            if part in self._ids:
                ids.append(self._ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _role(self, token_id: int, skip_special_tokens: bool) -> tuple[_Role, str]:
        token = self._token(token_id)
        if skip_special_tokens and token in self._special:
            return _Role.SKIP, token
        if token in self._legacy:
            return _Role.LITERAL, token
        return (_Role.MARK if token in self._special else _Role.PIECE), token

    def _decode_run(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        texts: list[str] = []
        run: list[tuple[_Role, int, str]] = []
        for token_id in map(int, ids):
            role, token = self._role(token_id, skip_special_tokens)
            if role is _Role.LITERAL:
                if run and (text := self._run_text(run)):
                    texts.append(text)
                run = []
                texts.append(token)
            elif role is not _Role.SKIP:
                run.append((role, token_id, token))
        if run:
            texts.append(self._run_text(run))
        return self._clean(" ".join(texts))

    def _run_text(self, run: list[tuple[_Role, int, str]]) -> str:
        """transformers' Llama-style `convert_tokens_to_string` for one run."""
        text, segment, after_mark = "", [], True
        for role, token_id, token in run:
            if role is _Role.MARK:
                text += ("" if after_mark else " ") + self._sp.decode(segment) + token
                segment, after_mark = [], True
            else:
                segment.append(token_id)
                after_mark = False
        return text + self._sp.decode(segment)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        if token in self._ids:
            return self._ids[token]
        piece_id = self._sp.piece_to_id(token)
        return piece_id if self._sp.id_to_piece(piece_id) == token else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return [self._ids[t] for t in self.special_tokens]


class JsonTokenizer(Tokenizer):
    """A ``tokenizer.json`` checkpoint, run by the ``tokenizers`` library like transformers'
    fast tokenizers; added and special tokens that ``tokenizer_config.json`` declares but the
    file lacks are added."""

    def __init__(self, tokenizer_file: Path, config: dict[str, Any], chat_template: str | None):
        super().__init__(config, chat_template)
        self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        declared = [
            _AddedToken.from_config(entry) for _, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
        ]
        for token in declared + [_AddedToken(t) for t in self.special_tokens]:
            if self._tok.token_to_id(token.content) is None:
                added = tokenizers.AddedToken(
                    token.content,
                    single_word=token.single_word,
                    lstrip=token.lstrip,
                    rstrip=token.rstrip,
                    normalized=token.normalized,
                    special=token.special,
                )
                (self._tok.add_special_tokens if token.special else self._tok.add_tokens)([added])
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return self._clean(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def _role(self, token_id: int, skip_special_tokens: bool) -> tuple[_Role, str]:
        skip = skip_special_tokens and token_id in self._special_ids
        return (_Role.SKIP if skip else _Role.PIECE), self._tok.id_to_token(token_id)

    def _decode_run(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas for streaming.

    Concatenating every `add` result and the final `flush` gives exactly
    ``tokenizer.decode(ids, skip_special_tokens)``. Per token only a short window of ids is
    decoded (vLLM/TGI's prefix/read offsets), text ending in U+FFFD (half a UTF-8 character) is
    held back until complete, and the space-joining of decode's runs is replayed as it happens.
    One exception, since the exact text would need the whole stream held back: with
    skip_special_tokens=False, a special token inside a run (``<s>``, ``<unk>`` for IQuest)
    after decoded text streams as ``text <s>`` where decode gives `` text<s>``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._cleanup = _StreamingCleanUp() if tokenizer.clean_up_tokenization_spaces else None
        self._after_literal = False  # the next run or literal is joined with a space
        self._in_run = False
        self._run_has_text = False
        self._window: list[int] = []  # ids of the current run segment, from the prefix offset
        self._read = 0  # window[:read] is already emitted

    def add(self, token_id: int) -> str:
        """Text that `token_id` completes (possibly "")."""
        role, token = self._tokenizer._role(int(token_id), self._skip)
        if role is _Role.SKIP:
            return ""
        if role is _Role.LITERAL:
            return self._emit(self._literal(token))
        text = " " if self._after_literal and not self._in_run else ""
        self._in_run = True
        if role is _Role.PIECE:
            run_text = self._add_piece(int(token_id))
        else:
            run_text = self._end_segment() + (" " if self._window else "") + token
            self._window, self._read = [], 0
        self._run_has_text = self._run_has_text or bool(run_text)
        return self._emit(text + run_text)

    def flush(self) -> str:
        """Text held back at the end of the stream (an incomplete UTF-8 character)."""
        text = self._end_segment()
        self._window, self._read = [], 0
        return self._emit(text, final=True)

    def _literal(self, token: str) -> str:
        if self._in_run:
            text = self._end_segment()
            space = self._run_has_text or bool(text)
        else:
            text, space = "", self._after_literal
        self._window, self._read = [], 0
        self._in_run, self._run_has_text, self._after_literal = False, False, True
        return text + (" " if space else "") + token

    def _add_piece(self, token_id: int) -> str:
        self._window.append(token_id)
        prefix = self._tokenizer._decode_run(self._window[: self._read])
        text = self._tokenizer._decode_run(self._window)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(prefix) :]

    def _end_segment(self) -> str:
        """The held-back rest of the current segment."""
        prefix = self._tokenizer._decode_run(self._window[: self._read])
        return self._tokenizer._decode_run(self._window)[len(prefix) :]

    def _emit(self, text: str, final: bool = False) -> str:
        return text if self._cleanup is None else self._cleanup.push(text, final)


class _StreamingCleanUp:
    """`clean_up_tokenization` over a stream.

    Every pattern starts with a space, is at most four characters long, and replacing only
    removes spaces, so no match can straddle a cut made after four non-space characters: text
    is cleaned and released up to the last such cut. What is held back never contains four
    non-space characters in a row, so a new cut can only end in the new text.
    """

    def __init__(self) -> None:
        self._pending = ""

    def push(self, text: str, final: bool) -> str:
        start = max(len(self._pending) - 3, 0)
        self._pending += text
        cut = len(self._pending) if final else self._last_cut(start)
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return clean_up_tokenization(ready)

    def _last_cut(self, start: int) -> int:
        """End of the last four non-space characters at or after `start`, 0 if none."""
        run = 0
        for i in range(len(self._pending) - 1, start - 1, -1):
            run = 0 if self._pending[i] == " " else run + 1
            if run == 4:
                return i + 4
        return 0
