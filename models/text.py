"""Text in and out: the checkpoint's own tokenizer (local files only), its chat template, and decoding a token
stream into text that never emits half a character.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
"""What a byte-level tokenizer decodes an incomplete UTF-8 sequence to."""


def load_tokenizer(checkpoint: Path) -> Any | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer files (``--prompt-ids`` still works)."""
    if not ((checkpoint / "tokenizer.json").is_file() or (checkpoint / "tokenizer_config.json").is_file()):
        log.info("%s has no tokenizer files: text prompts are refused, token ids work", checkpoint)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template."""


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token ids of ``prompt``; with ``chat``, of ``prompt`` as one user turn in the chat template, ready for the
    assistant's answer."""
    if not chat:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}])


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (``{"role", "content"}`` turns) in the chat template, ready for the assistant's
    answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("this checkpoint's tokenizer has no chat template: send the prompt without chat")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, one call per token.

    A delta is released only once it decodes without a trailing replacement character, so a multi-byte character
    split over several tokens appears whole, in the delta of the token that completes it. Decoding restarts a few
    tokens back (``prefix_offset``) rather than from the beginning, which keeps the cost per token constant while
    giving tokenizers that strip or add leading spaces the context they need.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        """Start of the decoding window."""
        self.read_offset = 0
        """Tokens before this one have been released as text."""

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return window[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window[len(prefix) :]
