"""Tokenizer tests: the release's golden data, round trips, streaming, tokenizer.json checkpoints."""

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopcoder.tokenizer import (
    IncrementalDetokenizer,
    JsonTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "tokenizer-iquest"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text(encoding="utf-8")) if GOLDEN.is_dir() else {"encode": [], "chat": []}
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden data not found at {GOLDEN}")

# The golden tokenizer.model has 3000 pieces: 0-2 are <unk> <s> </s>, 3-258 are byte pieces.
PIECES = range(3, 3000)
UTF8_BYTE_PIECES = [3 + b for b in range(0x80, 0x100)]
# <unk> and <s> are specials inside the SentencePiece vocabulary: see test_stream_special_inside_run.
IN_RUN_SPECIALS = {0, 1}
STREAM_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CODE = 'def f(x):\n\tif x:\n\t\treturn "héllo wörld — 你好 🙂"\n\n    # 2 spaces  and\ttab\n'


@pytest.fixture(scope="module")
def iquest() -> Tokenizer:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return load_tokenizer(GOLDEN)


def added_token_ids() -> list[int]:
    config = json.loads((GOLDEN / "tokenizer_config.json").read_text(encoding="utf-8"))
    return sorted(int(i) for i in config["added_tokens_decoder"])


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    """Stream `ids`, checking that the text never runs ahead of what the ids decode to."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    text = ""
    for n, token_id in enumerate(ids, 1):
        text += detok.add(token_id)
        assert tok.decode(ids[:n], skip_special_tokens=skip_special_tokens).startswith(text)
    return text + detok.flush()


# --- the released tokenizer, against data from its own class ------------------------------------


@needs_golden
@pytest.mark.parametrize("case", EXPECTED["encode"], ids=lambda c: repr(c["text"][:24]))
def test_golden_encode_decode(iquest, case):
    assert iquest.encode(case["text"]) == case["ids"]
    assert iquest.decode(case["ids"]) == case["decoded"]
    assert iquest.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@needs_golden
@pytest.mark.parametrize("case", EXPECTED["chat"], ids=lambda c: repr(c["messages"][-1]["content"][:24]))
def test_golden_chat_template(iquest, case):
    kwargs = dict(tools=case.get("tools"), add_generation_prompt=case["add_generation_prompt"])
    assert iquest.apply_chat_template(case["messages"], tokenize=False, **kwargs) == case["rendered"]
    assert iquest.apply_chat_template(case["messages"], **kwargs) == case["ids"]


@needs_golden
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("case", EXPECTED["encode"], ids=lambda c: repr(c["text"][:24]))
def test_golden_stream(iquest, case, skip):
    if not skip and IN_RUN_SPECIALS & set(case["ids"]):
        pytest.skip("covered by test_stream_special_inside_run")
    assert stream(iquest, case["ids"], skip) == case["decoded_skip_special" if skip else "decoded"]


def test_stream_special_inside_run(iquest):
    # decode puts the space before the text preceding <s>; a stream cannot take text back.
    ids = iquest.encode("x</s>y<s>z")
    assert iquest.decode(ids) == " x</s> y<s>z"
    detok = IncrementalDetokenizer(iquest)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "x</s> y <s>z"


def test_release_special_tokens(iquest):
    assert isinstance(iquest, SentencePieceTokenizer)
    assert (iquest.bos_token_id, iquest.eos_token_id, iquest.pad_token_id) == (1, 75864, 75869)
    assert iquest.encode("hi") == iquest.encode("hi", add_special_tokens=False)  # add_bos_token false
    # Named specials missing from the vocabulary get ids after it, as in transformers.
    assert iquest.convert_ids_to_tokens([3022, 3026]) == ["<|CLS|>", "<|PAD|>"]
    assert iquest.vocab_size == 3000 + 22 + 5
    assert iquest.eos_token_id in iquest.all_special_ids and 75876 not in iquest.all_special_ids
    assert "<|im_start|>" in iquest.chat_template


def test_every_added_token_is_atomic(iquest):
    for token_id in added_token_ids() + iquest.all_special_ids:
        (token,) = iquest.convert_ids_to_tokens([token_id])
        assert iquest.encode(token) == [token_id]
        assert token_id in iquest.encode(f"a {token} b")
        assert iquest.decode([token_id]) == token
        kept = "" if token_id in iquest.all_special_ids else token
        assert iquest.decode([token_id], skip_special_tokens=True) == kept


def test_skip_special_tokens_follows_the_release(iquest):
    # <tool_call> and </s> are not named specials; <think> is (additional_special_tokens).
    ids = iquest.encode("<think>a</think><tool_call>b</tool_call>x </s> y")
    # (Values from the release's class: "x " keeps its space and the join adds another.)
    assert iquest.decode(ids, skip_special_tokens=True) == "a <tool_call> b </tool_call> x  </s>  y"
    assert iquest.decode(ids) == "<think> a </think> <tool_call> b </tool_call> x  </s>  y"
    # single_word: </s> inside a word is plain text.
    assert 2 not in iquest.encode("x</s>y") and 2 in iquest.encode("x </s> y")


def test_round_trip_code(iquest):
    ids = iquest.encode(CODE)
    assert iquest.decode(ids) == CODE
    assert iquest.decode(ids, skip_special_tokens=True) == CODE
    assert stream(iquest, ids, skip_special_tokens=False) == CODE


def test_stream_window_stays_small(iquest):
    detok = IncrementalDetokenizer(iquest)
    for token_id in iquest.encode(CODE * 50):
        detok.add(token_id)
        assert len(detok._window) <= 8  # constant work per token, whatever the length


def test_fim_prompt(iquest):
    prompt = iquest.fim_prompt("def f(x):\n    ", "\n    return y")
    assert prompt == "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>"
    ids = iquest.encode(prompt)
    assert ids[0] == 75865 and ids[-1] == 75866 and 75867 in ids


def test_out_of_vocabulary_id(iquest):
    with pytest.raises(ValueError, match="3500"):
        iquest.decode([3500])


@given(data=st.data())
@STREAM_SETTINGS
@pytest.mark.parametrize("skip", [False, True])
def test_stream_equals_decode(iquest, skip, data):
    token = st.one_of(
        st.sampled_from(added_token_ids() + iquest.all_special_ids),
        st.sampled_from(UTF8_BYTE_PIECES),
        st.sampled_from(PIECES),
    )
    ids = data.draw(st.lists(token, max_size=40))
    if not skip:
        ids = [i for i in ids if i not in IN_RUN_SPECIALS]
    assert stream(iquest, ids, skip) == iquest.decode(ids, skip_special_tokens=skip)


# --- loading ---------------------------------------------------------------------------------------


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_use_fast_false_prefers_sentencepiece(tmp_path, bpe_dir):
    if not GOLDEN.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN}")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(GOLDEN / name, tmp_path / name)
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


# --- tokenizer.json checkpoints ----------------------------------------------------------------------

CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson + '\\n' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]


def write_bpe_checkpoint(path: Path, clean_up: bool) -> Path:
    """A tiny byte-level BPE checkpoint, Qwen style, with a ChatML template."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [CODE, "Hello world. It's fine, isn't it? We're done!", "def fib(n):\n    return n\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([tokenizers.AddedToken("<tool_call>", special=False)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": {"content": "<|endoftext|>", "special": True},
        "bos_token": None,
        "clean_up_tokenization_spaces": clean_up,
        "chat_template": CHATML,
        # Declared in the config only: must be added, atomic, and kept by skip_special_tokens.
        "added_tokens_decoder": {"400": {"content": "<think>", "special": False}},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return write_bpe_checkpoint(tmp_path_factory.mktemp("bpe"), clean_up=False)


@pytest.fixture(scope="module", params=[False, True], ids=["raw", "clean_up"])
def bpe(request, tmp_path_factory) -> Tokenizer:
    return load_tokenizer(write_bpe_checkpoint(tmp_path_factory.mktemp("bpe"), clean_up=request.param))


def test_json_round_trip(bpe):
    assert isinstance(bpe, JsonTokenizer)
    text = "<|im_start|>user\n" + CODE + "<tool_call>{}</tool_call><think>x</think><|im_end|>"
    ids = bpe.encode(text)
    for token in SPECIALS[1:3] + ["<tool_call>", "<think>"]:
        assert bpe.token_to_id(token) in ids
    assert bpe.decode(ids) == text
    assert bpe.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert (bpe.eos_token_id, bpe.pad_token_id, bpe.bos_token_id) == (2, 0, None)
    assert set(bpe.all_special_ids) == set(range(len(SPECIALS)))
    assert bpe.vocab_size == bpe.token_to_id("<think>") + 1  # added last, from the config


def test_json_clean_up_follows_config(bpe):
    ids = bpe.encode("done . is n't it ?")
    assert bpe.decode(ids) == ("done. isn't it?" if bpe.clean_up_tokenization_spaces else "done . is n't it ?")


def test_json_chat_template_and_fim(bpe):
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"name": "f", "description": "a <b> & 'c' é"}]
    rendered = bpe.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        '<|im_start|>system\n{"name": "f", "description": "a <b> & \'c\' é"}\n<|im_end|>\n'
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert bpe.apply_chat_template(messages, tools=tools, add_generation_prompt=True) == bpe.encode(rendered, add_special_tokens=False)
    prompt = bpe.fim_prompt("a", "b")
    assert bpe.encode(prompt)[0] == bpe.token_to_id("<|fim_prefix|>")
    assert bpe.decode(bpe.encode(prompt)) == prompt


def test_template_environment(tmp_path, bpe_dir):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{% if not messages %}{{ raise_exception('no messages') }}{% endif %}"
        "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=1, sort_keys=true) }}|"
        "{{ strftime_now('%Y') | length }}|{{ extra }}|{{ eos_token }}"
    )
    tok = load_tokenizer(tmp_path)
    message = {"role": "user", "content": "<a> & 'b' é"}
    rendered = tok.apply_chat_template([message], tokenize=False, extra=7)
    first = json.dumps(message, ensure_ascii=False)
    indented = json.dumps(message, ensure_ascii=False, indent=1, sort_keys=True)
    assert rendered == f"{first}|{indented}|4|7|"  # no config: no eos_token
    with pytest.raises(jinja2.TemplateError, match="no messages"):
        tok.apply_chat_template([], tokenize=False)


def test_fim_needs_fim_tokens(tmp_path):
    tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        load_tokenizer(tmp_path).fim_prompt("a", "b")


@given(data=st.data())
@STREAM_SETTINGS
@pytest.mark.parametrize("skip", [False, True])
def test_json_stream_equals_decode(bpe, skip, data):
    punctuation = [bpe.token_to_id(t) for t in ("Ġ", ".", "'", "n", "t", "s", "?", ",")]
    utf8_bytes = [bpe.token_to_id(t) for t in tokenizers.pre_tokenizers.ByteLevel.alphabet() if ord(t) > 0x80]
    token = st.one_of(st.integers(0, bpe.vocab_size - 1), st.sampled_from(punctuation), st.sampled_from(utf8_bytes))
    ids = data.draw(st.lists(token, max_size=40))
    assert stream(bpe, ids, skip) == bpe.decode(ids, skip_special_tokens=skip)
