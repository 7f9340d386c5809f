"""The host-compute exchange: what an expert computed on the host reads and writes (``--host-compute``).

Inputs, one record per MoE layer, written by the inference worker before it reports the gate: a seqlock header
(seq, request_id, step, n_tokens), the layer's input rows ``[n_tokens, H]`` and the gate's ``top_k_index``
``[n_tokens, k]``. Only small steps (at most ``max_tokens`` tokens; a decode step) are written.

Outputs, one record per (MoE layer, index of the expert among the gate's chosen experts in ascending order),
written by the loader's host-compute thread: a seqlock header (seq, request_id, step, expert, n_rows) and the
expert's unweighted output rows ``[n_rows, H]``. The inference worker takes an expert's output from here when the
header names its (request_id, step, expert) and the sequence was even and unchanged across the copy.

Rows are float32: every compute dtype (float32, bfloat16, float16) converts to it and back exactly, so what the
host computes from them is what the device would. Every record is a seqlock record (``shm/seqlock.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from shm import seqlock
from shm.segment import Segment

_IN_WORDS = 4  # seq, request_id, step, n_tokens
_OUT_WORDS = 5  # seq, request_id, step, expert, n_rows


def outputs_per_layer(experts_per_layer: int, top_k: int, max_tokens: int) -> int:
    """Most experts one gate of at most ``max_tokens`` tokens can choose."""
    return min(experts_per_layer, top_k * max_tokens)


class HostExchange:
    def __init__(self, segment: Segment, n_layers: int, experts_per_layer: int, top_k: int, hidden_size: int,
                 max_tokens: int) -> None:
        need = self.nbytes_for(n_layers, experts_per_layer, top_k, hidden_size, max_tokens)
        if segment.nbytes < need:
            raise ValueError(f"segment {segment.name} holds {segment.nbytes} bytes, exchange needs {need}")
        self.segment = segment
        self.max_tokens = max_tokens
        n_out = outputs_per_layer(experts_per_layer, top_k, max_tokens)
        buf, offset = segment.buf, 0

        def words(n: int, width: int) -> np.ndarray:
            nonlocal offset
            array = np.frombuffer(buf, dtype=np.int64, count=n * width, offset=offset).reshape(n, width)
            offset += 8 * n * width
            return array

        def floats(*shape: int) -> torch.Tensor:
            nonlocal offset
            count = int(np.prod(shape))
            tensor = torch.frombuffer(buf, dtype=torch.float32, offset=offset, count=count).view(*shape)
            offset += 4 * count
            return tensor

        self._in_header = words(n_layers, _IN_WORDS)
        self._in_index = torch.from_numpy(words(n_layers, max_tokens * top_k)).view(n_layers, max_tokens, top_k)
        self._out_header = words(n_layers * n_out, _OUT_WORDS).reshape(n_layers, n_out, _OUT_WORDS)
        self._in_rows = floats(n_layers, max_tokens, hidden_size)
        self._out_rows = floats(n_layers, n_out, max_tokens, hidden_size)

    @staticmethod
    def nbytes_for(n_layers: int, experts_per_layer: int, top_k: int, hidden_size: int, max_tokens: int) -> int:
        n_out = outputs_per_layer(experts_per_layer, top_k, max_tokens)
        return (8 * n_layers * (_IN_WORDS + max_tokens * top_k + n_out * _OUT_WORDS)
                + 4 * n_layers * (1 + n_out) * max_tokens * hidden_size)

    # ------------------------------------------------------------ inputs (inference worker -> host)
    def write_input(self, layer: int, request_id: int, step: int, hidden: torch.Tensor,
                    top_k_index: torch.Tensor) -> bool:
        """Publish a layer's input ``[T, H]`` and ``top_k_index [T, k]``; False (nothing written) if T is above
        ``max_tokens``."""
        n = hidden.shape[0]
        if n > self.max_tokens:
            return False

        def write_data() -> None:
            self._in_rows[layer, :n].copy_(hidden)
            self._in_index[layer, :n].copy_(top_k_index)

        seqlock.publish(self._in_header[layer], (request_id, step, n), write_data)
        return True

    def read_input(self, layer: int, request_id: int, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Copies of (rows ``[T, H]`` float32, ``top_k_index [T, k]``) if the record is still (request_id, step)."""
        header = self._in_header[layer]

        def copy_data() -> tuple[torch.Tensor, torch.Tensor]:
            n = int(header[3])
            return self._in_rows[layer, :n].clone(), self._in_index[layer, :n].clone()

        return seqlock.read(header, (request_id, step), copy_data)

    # ------------------------------------------------------------ outputs (host -> inference worker)
    def write_output(self, layer: int, index: int, request_id: int, step: int, expert: int,
                     rows: torch.Tensor) -> None:
        """Publish one expert's unweighted output rows ``[n, H]``."""
        n = rows.shape[0]
        seqlock.publish(self._out_header[layer, index], (request_id, step, expert, n),
                        lambda: self._out_rows[layer, index, :n].copy_(rows))

    def read_output(self, layer: int, index: int, request_id: int, step: int, expert: int) -> torch.Tensor | None:
        """A copy of the output rows ``[n, H]`` (float32) if the record is complete and names this expert of this
        request and step; None otherwise (not computed yet, or being written)."""
        header = self._out_header[layer, index]
        return seqlock.read(header, (request_id, step, expert),
                            lambda: self._out_rows[layer, index, : int(header[4])].clone())

    def close(self) -> None:
        del self._in_header, self._in_index, self._out_header, self._in_rows, self._out_rows
        self.segment.close()
