"""The hidden-state exchange: the input of each MoE layer, written by the inference worker, read by the predictor.

One record per MoE layer: a sequence number, the step, the number of rows, and up to ``max_tokens`` rows of the
hidden state (float32), a seqlock record (``shm/seqlock.py``) written by the inference worker and copied by the
predictor. A record that was overwritten before the predictor got to it is dropped: the prediction would be for a
layer already past.
"""

from __future__ import annotations

import numpy as np
import torch

from shm import seqlock
from shm.segment import Segment

_HEADER_WORDS = 4  # seq, request_id, step, n_tokens


class HiddenExchange:
    def __init__(self, segment: Segment, n_layers: int, hidden_size: int, max_tokens: int) -> None:
        need = self.nbytes_for(n_layers, hidden_size, max_tokens)
        if segment.nbytes < need:
            raise ValueError(f"segment {segment.name} holds {segment.nbytes} bytes, exchange needs {need}")
        self.segment = segment
        self.max_tokens = max_tokens
        header_nbytes = 8 * _HEADER_WORDS * n_layers
        self._header = np.frombuffer(segment.buf, dtype=np.int64, count=_HEADER_WORDS * n_layers).reshape(
            n_layers, _HEADER_WORDS)
        self._rows = torch.frombuffer(segment.buf, dtype=torch.float32, offset=header_nbytes,
                                      count=n_layers * max_tokens * hidden_size).view(n_layers, max_tokens,
                                                                                      hidden_size)

    @staticmethod
    def nbytes_for(n_layers: int, hidden_size: int, max_tokens: int) -> int:
        return 8 * _HEADER_WORDS * n_layers + 4 * n_layers * max_tokens * hidden_size

    def write(self, layer: int, request_id: int, step: int, hidden: torch.Tensor) -> int:
        """Publish the last ``max_tokens`` rows of ``hidden`` [T, H]; returns how many rows were written."""
        rows = hidden[-self.max_tokens:]  # [n, H]
        n = rows.shape[0]
        seqlock.publish(self._header[layer], (request_id, step, n), lambda: self._rows[layer, :n].copy_(rows))
        return n

    def read(self, layer: int, request_id: int, step: int) -> torch.Tensor | None:
        """A copy of the rows of ``layer`` if they are still those of (``request_id``, ``step``), else None."""
        header = self._header[layer]
        return seqlock.read(header, (request_id, step), lambda: self._rows[layer, : int(header[3])].clone())  # [n, H]

    def close(self) -> None:
        del self._header, self._rows
        self.segment.close()
