"""Text: streamed deltas never split a multi-byte character; the chat template; the tokenizer of the checkpoint."""

from __future__ import annotations

import pytest

from models.text import IncrementalDetokenizer, NoChatTemplate, encode_prompt, load_tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_checkpoints):
    """Token id = byte value (the tiny checkpoints' tokenizer), with a chat template."""
    return load_tokenizer(tiny_checkpoints["qwen2_moe"])


def stream(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_a_character_split_over_tokens_appears_whole_in_the_token_that_completes_it(byte_tokenizer):
    text = "a\u00e9b\U0001f600c"  # 1 + 2 + 1 + 4 + 1 bytes
    ids = list(text.encode())
    assert byte_tokenizer.decode(ids[:2]) == "a\ufffd"  # decoding a prefix alone would emit garbage
    deltas = stream(byte_tokenizer, ids)
    assert deltas == ["a", "", "\u00e9", "b", "", "", "", "\U0001f600", "c", ""]
    assert "".join(deltas) == text


def test_deltas_add_up_to_the_decoded_text(byte_tokenizer):
    text = "d\u00e9j\u00e0 vu \u4e2d\u6587 \u00fcber\n\u20ac5"
    ids = list(text.encode())
    deltas = stream(byte_tokenizer, ids)
    assert "".join(deltas) == byte_tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_an_incomplete_character_at_the_end_is_flushed_as_replacement(byte_tokenizer):
    ids = [*b"ok", 0xE2, 0x82]  # the first two bytes of the euro sign
    deltas = stream(byte_tokenizer, ids)
    assert deltas[:-1] == ["o", "k", "", ""]
    assert "".join(deltas) == byte_tokenizer.decode(ids)


def test_chat_template_wraps_the_prompt_as_a_user_turn(byte_tokenizer):
    ids = encode_prompt(byte_tokenizer, "hi", chat=True)
    assert bytes(ids).decode() == "<user>hi\n<assistant>"
    assert encode_prompt(byte_tokenizer, "hi", chat=False) == list(b"hi")


def test_chat_without_a_template_is_a_clear_error(checkpoint):
    tokenizer = load_tokenizer(checkpoint)  # the embedded default ships no chat template
    with pytest.raises(NoChatTemplate, match="no chat template"):
        encode_prompt(tokenizer, "hi", chat=True)


def test_no_tokenizer_files_means_no_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None

