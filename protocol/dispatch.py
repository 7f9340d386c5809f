"""The one dispatcher: every inbox loop of the runtime (the workers', the loader's, the coordinator's two, the
supervisor's) hands each decoded message to the handler registered for its type.

A message of a type the loop has no handler for is logged, counted and dropped, never fatal; the call returns False
so that a loop with someone to answer (the coordinator, to a client) can say so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from protocol.messages import Message

log = logging.getLogger(__name__)

Handler = Callable[..., object]
"""Called with the loop's context (the coordinator's client loop: the envelope), then the message."""


class Dispatcher:
    def __init__(self, where: str, handlers: Mapping[type[Message], Handler],
                 unexpected_level: int = logging.ERROR) -> None:
        self.where = where
        """Whose inbox, for the log."""
        self.handlers = dict(handlers)
        self.unexpected_level = unexpected_level
        """How loudly an unhandled message is logged (a client's: debug; between the runtime's processes: a bug)."""
        self.unexpected = 0
        """Messages dropped because no handler takes their type."""

    def __call__(self, msg: Message, *context: Any) -> bool:
        """Call ``handler(*context, msg)`` for ``msg``'s type; False if there is none (logged and counted)."""
        handler = self.handlers.get(type(msg))
        if handler is None:
            self.unexpected += 1
            log.log(self.unexpected_level, "%s: dropped %s, which is not handled here (%d so far)", self.where,
                    type(msg).__name__, self.unexpected)
            return False
        handler(*context, msg)
        return True
