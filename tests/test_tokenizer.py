"""server.tokenizer against transformers (the reference) and against the OpenAI stop-string semantics."""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from server.tokenizer import (
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
    build_byte_tokenizer,
)
from tests.support.tokenizer_checkpoints import CORPUS, LLAMA3_TEMPLATE, write_llama3, write_qwen2

transformers = pytest.importorskip("transformers")

ENCODE_TEXTS = [
    "",
    "A",
    "Hello world",
    " leading and trailing spaces  ",
    "I'm sure they'll say it's 1234567 times better.",
    "line one\nline two\r\n\n  indented\ttab",
    "Café naïve cafe\u0301",  # precomposed and decomposed é: Qwen2's NFC normalizer merges them
    "emoji 😀👍🏽 and 中文字符",
    "literal special <|im_start|>user\nhi<|im_end|> inside text",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Café? 😀"},
    ],
]


@pytest.fixture(params=["llama3", "qwen2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    writer = write_llama3 if request.param == "llama3" else write_qwen2
    return writer(tmp_path / request.param)


def hf_tokenizer(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path))


def hf_render(hf: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------------------------------
# The byte tokenizer


@cache
def byte_tok() -> Tokenizer:
    return build_byte_tokenizer()


@pytest.mark.parametrize(
    "text", ["", "plain ASCII, with punctuation!", "emoji 😀👍🏽🇫🇷", "中文字符 日本語 한국어"]
)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = byte_tok()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tok.decode(ids) == text


def test_byte_tokenizer_layout() -> None:
    tok = byte_tok()
    assert tok.encode("A") == [256, 65]
    assert tok.encode("A", add_special_tokens=False) == [65]
    assert tok.encode("<|begin_of_text|>A") == [
        256,
        256,
        65,
    ]  # BOS once from the post-processor, once as text
    assert tok.vocab_size == 260
    assert tok.eos_token_ids == {257, 259}
    assert [tok.token_text(i) for i in (256, 257, 258, 259)] == [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    # Byte i is token i: the ids follow the ByteLevel alphabet in byte order.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    assert {tok.backend.id_to_token(i) for i in range(256)} == alphabet
    assert tok.decode([257, 72, 105, 259]) == "Hi"
    assert tok.decode([257, 72, 105, 259], skip_special_tokens=False) == "<|end_of_text|>Hi<|im_end|>"


def test_byte_tokenizer_is_deterministic() -> None:
    a, b = build_byte_tokenizer(), build_byte_tokenizer()
    assert a.backend.to_str() == b.backend.to_str()
    assert a.chat_template == b.chat_template


def test_byte_tokenizer_token_bytes() -> None:
    tok = byte_tok()
    assert tok.token_text(65) == "A"
    assert tok.token_bytes(65) == [65]
    assert tok.token_bytes(0xF0) == [0xF0]  # half an emoji: the raw byte, not U+FFFD's bytes
    assert tok.token_bytes(259) == list(b"<|im_end|>")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_any_text_round_trips(text: str) -> None:
    assume("<|" not in text)  # literal special-token text is encoded as the special token, by design
    tok = byte_tok()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_byte_tokenizer_chat_template() -> None:
    tok = byte_tok()
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|begin_of_text|><|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[:2] == [256, 258]
    with pytest.raises(ChatTemplateError, match="must be a string"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_save_then_load_matches_ours_and_transformers(tmp_path: Path) -> None:
    tok = byte_tok()
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    hf = hf_tokenizer(tmp_path)
    for text in ENCODE_TEXTS:
        assert again.encode(text) == tok.encode(text) == hf.encode(text), text
        assert again.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert again.chat_template == tok.chat_template
    assert (again.bos_token_id, again.eos_token_ids) == (tok.bos_token_id, tok.eos_token_ids)
    assert again.vocab_size == tok.vocab_size == len(hf)
    for chat in CHATS:
        for gen in (True, False):
            assert (
                again.apply_chat_template(chat, gen)
                == tok.apply_chat_template(chat, gen)
                == hf_render(hf, chat, gen)
            )


# --------------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def test_from_dir_matches_transformers(checkpoint: Path) -> None:
    tok = Tokenizer.from_dir(checkpoint)
    hf = hf_tokenizer(checkpoint)
    assert tok.vocab_size == len(hf)
    for text in ENCODE_TEXTS + CORPUS:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == hf.encode(
                text, add_special_tokens=special
            ), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == hf.decode(
            hf.encode(text), skip_special_tokens=False
        )
    for chat in CHATS:
        for gen in (True, False):
            rendered = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert rendered == hf_render(hf, chat, gen)
            assert tok.encode(rendered, add_special_tokens=False) == hf.encode(
                rendered, add_special_tokens=False
            )


def test_llama3_bos_once(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_llama3(tmp_path))
    bos = tok.bos_token_id
    assert bos is not None and tok.encode("Hi")[0] == bos and tok.encode("Hi").count(bos) == 1
    prompt = tok.apply_chat_template(CHATS[0])
    assert prompt.startswith("<|begin_of_text|>")
    assert tok.encode(prompt, add_special_tokens=False).count(bos) == 1
    assert tok.eos_token_ids == {tok.token_to_id("<|eot_id|>")}


def test_qwen2_has_no_bos(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_qwen2(tmp_path))
    assert tok.bos_token_id is None
    assert tok.encode("Hi") == tok.encode("Hi", add_special_tokens=False)
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>")}


@pytest.mark.parametrize(
    ("writer", "config"),
    [
        (write_llama3, {"add_bos_token": False}),
        (write_llama3, {"add_bos_token": True, "add_eos_token": True}),
        (write_qwen2, {"bos_token": "<|endoftext|>", "add_bos_token": True}),
    ],
)
def test_tokenizer_json_decides_bos_like_transformers(
    tmp_path: Path, writer: Any, config: dict[str, Any]
) -> None:
    """transformers v5 ignores add_bos_token/add_eos_token when tokenizer.json exists; so do we."""
    path = writer(tmp_path, **config)
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    for text in ("", "Hello world"):
        assert tok.encode(text) == hf.encode(text)
    assert tok.add_bos_token == (writer is write_llama3)


def test_save_round_trips_a_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(checkpoint)
    tok.save(tmp_path / "saved")
    again, hf = Tokenizer.from_dir(tmp_path / "saved"), hf_tokenizer(tmp_path / "saved")
    for text in ENCODE_TEXTS:
        assert again.encode(text) == tok.encode(text) == hf.encode(text)
    assert again.chat_template == tok.chat_template
    assert again.apply_chat_template(CHATS[1]) == tok.apply_chat_template(CHATS[1]) == hf_render(hf, CHATS[1])


def test_special_tokens_as_added_token_dicts(tmp_path: Path) -> None:
    path = write_llama3(
        tmp_path,
        bos_token={"content": "<|begin_of_text|>", "special": True},
        eos_token={"content": "<|end_of_text|>", "special": True},
    )
    tok = Tokenizer.from_dir(path)
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token_ids == {tok.token_to_id("<|end_of_text|>")}
    assert tok.apply_chat_template(CHATS[0]).startswith("<|begin_of_text|>")


def test_named_chat_templates_use_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": LLAMA3_TEMPLATE}]
    path = write_llama3(tmp_path, chat_template=templates)
    tok = Tokenizer.from_dir(path)
    assert tok.chat_template == LLAMA3_TEMPLATE
    assert tok.apply_chat_template(CHATS[1]) == hf_render(hf_tokenizer(path), CHATS[1])


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    path = write_qwen2(tmp_path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    tok = Tokenizer.from_dir(path)
    assert tok.apply_chat_template(CHATS[1]) == "[system][user][assistant][user]"
    assert tok.apply_chat_template(CHATS[1]) == hf_render(hf_tokenizer(path), CHATS[1])


@pytest.mark.parametrize("eos", [[128001, 128009], 128001])
def test_generation_config_eos_merged(tmp_path: Path, eos: Any) -> None:
    path = write_llama3(tmp_path)
    tok = Tokenizer.from_dir(path)
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    # Ids in generation_config.json are ids, whatever the vocabulary: map the Llama-3 numbers onto ours.
    ours = {128001: end, 128009: eot}
    ids = [ours[i] for i in eos] if isinstance(eos, list) else ours[eos]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids, "bos_token_id": 1}))
    assert Tokenizer.from_dir(path).eos_token_ids == {eot, end}


def test_from_dir_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    byte_tok().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_template_gets_tojson_and_extra_variables() -> None:
    tok = Tokenizer(
        byte_tok().backend,
        chat_template="{{ messages[0] | tojson }}|{{ tools is none }}|{{ greeting }}"
        "|{{ strftime_now('%Y') | length }}",
    )
    out = tok.apply_chat_template([{"role": "user", "content": "<é>", "name": None}], greeting="hi")
    assert out == '{"role": "user", "content": "<é>"}|True|hi|4'


TOOLS_TEMPLATE = """{%- set ns = namespace(n=0) %}
{%- if tools is not none %}Tools: {{ tools | tojson }}
{% endif %}
{%- for message in messages %}
    {%- if message['role'] == 'stop' %}{% break %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}<{{ message['content'] }}>{% endgeneration %}
    {%- else %}
        [{{ message['role'] }}] {{ message['content'] }}
    {%- endif %}
{% endfor %}
count={{ ns.n }}{{ eos_token }}"""


def test_template_features_match_transformers(tmp_path: Path) -> None:
    """namespace, break, {% generation %}, tojson on tools and eos_token render exactly as in transformers."""
    tok = Tokenizer(
        byte_tok().backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        chat_template=TOOLS_TEMPLATE,
    )
    tok.save(tmp_path)
    hf = hf_tokenizer(tmp_path)
    tools = [{"type": "function", "function": {"name": "f", "description": "a < b & 'c'"}}]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "stop", "content": "-"},
        {"role": "user", "content": "never"},
    ]
    for kwargs in ({}, {"tools": tools}):
        ours = tok.apply_chat_template(messages, **kwargs)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert "count=2<|end_of_text|>" in ours and "a < b & 'c'" in ours


# --------------------------------------------------------------------------------------------------
# Chat template errors


def test_chat_template_errors(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_llama3(tmp_path))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="messages\\[1\\]"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, "not a message"])  # type: ignore[list-item]
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template(CHATS[0])
    with pytest.raises(ChatTemplateError):
        Tokenizer(tok.backend, chat_template="{% for %}").apply_chat_template(CHATS[0])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses to touch internals
        Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__ }}").apply_chat_template(CHATS[0])
    assert issubclass(ChatTemplateError, ValueError)


# --------------------------------------------------------------------------------------------------
# IncrementalDetokenizer


def stream(
    tok: Tokenizer, ids: list[int], stop: list[str] | tuple[str, ...] = (), include: bool = False
) -> tuple[list[str], IncrementalDetokenizer]:
    """Push ids until a stop matches (as the engine does), then flush; return every delta."""
    detok = IncrementalDetokenizer(tok, stop=stop, include_stop_str_in_output=include)
    deltas = []
    for token_id in ids:
        delta, stopped = detok.push(token_id)
        deltas.append(delta)
        if stopped:
            return deltas, detok
    deltas.append(detok.flush())
    return deltas, detok


def reference_stop(text: str, stops: list[str], include: bool) -> str:
    """OpenAI semantics: cut at the first stop string to complete (ties: the longer one)."""
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    if not found:
        return text
    end, start = min(found)
    return text[: end if include else start]


@cache
def llama_tok() -> Tokenizer:
    # Shared by hypothesis tests, which cannot take function-scoped fixtures; from_dir reads everything into
    # memory, so the directory can go right away.
    with tempfile.TemporaryDirectory() as tmp:
        return Tokenizer.from_dir(write_llama3(Path(tmp)))


@pytest.mark.parametrize("which", ["byte", "llama3"])
def test_deltas_concatenate_to_full_decode(which: str) -> None:
    tok = byte_tok() if which == "byte" else llama_tok()
    # A run of emoji: merged tokens there can end inside a character several times in a row.
    text = " ".join(CORPUS) + " ¿Qué tal? 👍🏽 " + "😀" * 12 + "中文" * 5
    ids = tok.encode(text, add_special_tokens=False) + [tok.token_to_id("<|end_of_text|>")]
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_is_never_split() -> None:
    tok = byte_tok()
    ids = tok.encode("a😀b", add_special_tokens=False)
    assert len(ids) == 6
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i)[0] for i in ids]
    assert deltas == ["a", "", "", "", "😀", "b"]


def test_dangling_bytes_are_released_by_flush() -> None:
    tok = byte_tok()
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ord("x")) == ("x", False)
    assert detok.push(0xF0) == ("", False)
    assert detok.push(0x9F) == ("", False)
    assert detok.flush() == "\ufffd"


def test_stop_string_spanning_three_tokens_is_cut_exactly() -> None:
    tok = byte_tok()
    detok = IncrementalDetokenizer(tok, stop=["o w"])
    results = [detok.push(i) for i in tok.encode("Hello world. More", add_special_tokens=False)[:7]]
    assert results[-1][1] is True and not any(stopped for _, stopped in results[:-1])
    assert "".join(d for d, _ in results) == detok.text == "Hell"
    with pytest.raises(RuntimeError):
        detok.push(ord("x"))
    assert detok.flush() == ""


def test_stop_prefix_is_held_then_flushed() -> None:
    tok = byte_tok()
    detok = IncrementalDetokenizer(tok, stop=["Hello"])
    assert [detok.push(i) for i in b"Hel"] == [("", False)] * 3
    assert detok.text == ""
    assert detok.flush() == "Hel"
    assert detok.text == "Hel"


def test_stop_prefix_released_when_it_cannot_complete() -> None:
    tok = byte_tok()
    detok = IncrementalDetokenizer(tok, stop=["Hello"])
    assert [detok.push(i)[0] for i in b"HelHelp"] == ["", "", "", "Hel", "", "", "Help"]


def test_include_stop_str_in_output() -> None:
    deltas, detok = stream(byte_tok(), list(b"Hello world, again"), stop=["wor"], include=True)
    assert detok.text == "".join(deltas) == "Hello wor"


def test_earliest_stop_wins() -> None:
    deltas, detok = stream(byte_tok(), list(b"Hello world"), stop=["world", "lo"])
    assert detok.text == "Hel"
    deltas, detok = stream(
        llama_tok(), llama_tok().encode("Hello world", add_special_tokens=False), ["d", "ell"]
    )
    assert detok.text == "H"


def test_window_stays_small() -> None:
    """Each push decodes a handful of ids, never the whole output."""
    tok = byte_tok()
    longest = 0
    decode = tok.decode

    class Counting(Tokenizer):
        def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
            nonlocal longest
            longest = max(longest, len(ids))
            return decode(ids, skip_special_tokens)

    counting = Counting(tok.backend)
    text = "Streaming 😀 text, " * 200
    deltas, detok = stream(counting, counting.encode(text, add_special_tokens=False), stop=["never appears"])
    assert detok.text == text
    assert longest <= 8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from(["byte", "llama3"]), include=st.booleans())
def test_stop_strings_match_reference(data: st.DataObject, which: str, include: bool) -> None:
    tok = byte_tok() if which == "byte" else llama_tok()
    small_alphabet = st.text(st.sampled_from(list("ab c😀é中\n")), max_size=30)  # repeats, so stops recur
    # Text a request can carry: valid UTF-8 (the API refuses lone surrogates with a 400 before tokenizing).
    utf8 = st.characters(codec="utf-8", exclude_characters="\ufffd")
    any_text = st.text(utf8, max_size=40)
    text = data.draw(small_alphabet | any_text | st.sampled_from(CORPUS))
    assume("<|" not in text)

    def substring() -> st.SearchStrategy[str]:  # stops that often do occur, sometimes at odd offsets
        return st.tuples(st.integers(0, len(text)), st.integers(1, 6)).map(lambda p: text[p[0] : p[0] + p[1]])

    stops = data.draw(st.lists(substring() | st.text(utf8, min_size=1, max_size=4), max_size=3))
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = stream(tok, ids, stops, include)
    assert detok.text == "".join(deltas) == reference_stop(text, stops, include)
    assert not any("\ufffd" in d for d in deltas)
