"""The hidden-state exchange: the input of each MoE layer, written by the inference worker, read by the predictor.

One record per MoE layer: a sequence number, the step, the number of rows, and up to ``max_tokens`` rows of the
hidden state (float32). Writing is a seqlock: the sequence is odd while the inference worker writes; the predictor
copies the rows and accepts them only if the sequence was even and unchanged across the copy. A record that was
overwritten before the predictor got to it is dropped: the prediction would be for a layer already past.

No fences: the seqlock relies on x86-64 keeping the writer's stores and the reader's loads in program order
(``shm/ordering.py``; the runtime refuses to start on CPUs without that ordering).
"""

from __future__ import annotations

import numpy as np
import torch

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
        header = self._header[layer]
        header[0] += 1  # odd: being written
        self._rows[layer, :n].copy_(rows)
        header[1] = request_id
        header[2] = step
        header[3] = n
        header[0] += 1  # even: complete
        return n

    def read(self, layer: int, request_id: int, step: int) -> torch.Tensor | None:
        """A copy of the rows of ``layer`` if they are still those of (``request_id``, ``step``), else None."""
        header = self._header[layer]
        seq = int(header[0])
        if seq % 2 or header[1] != request_id or header[2] != step:
            return None
        rows = self._rows[layer, : int(header[3])].clone()  # [n, H]
        return rows if int(header[0]) == seq else None

    def close(self) -> None:
        del self._header, self._rows
        self.segment.close()
