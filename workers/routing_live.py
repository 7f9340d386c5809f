"""The predictor worker's routing mode (``--routing-predictor FILE.npz``): predictions from the gate decisions and
token ids the inference worker reports at every gate (``GateRouted`` from ``generate()``, one request at a time,
through ``RoutingPredictor.predict_at``; ``BatchRouted`` from the step loop, through ``predict_windows``).

Per request it keeps the routing of the last few tokens (``KEEP_TOKENS``: today's features read this token and the
two before it). At the gate of MoE layer ``l`` of step ``s`` it sends, one-way:

- ``ExpertsPredicted`` for the layer ``lookahead`` ahead (past the last layer: the next step's first layers), the
  top-k experts with their probabilities;
- ``OutlookPredicted``: the probability of every expert of layer ``l`` at its gate one token on (distance ``L``),
  which the promoe policy uses to rank what is resident for eviction.

The prefill is one step of many tokens that pass each layer together, so at layer ``l`` the earlier prompt tokens'
layers after ``l`` are not known yet. Targets that wrap into the first decode step, and the outlook, need none of
them and are predicted for the prompt's last token with the full window. A target inside the prefill step is
predicted for each of the last ``PREFILL_TOKENS`` prompt tokens as if it began a prompt (its own layers and token id
only) and the union of their top-k is sent, each with the probability that at least one of them chooses it: the gate
of a long prefill chooses the union over every token, and a few tokens' worth of guesses is what a speculative load
can usefully add before the precise loads of that layer take the link.

With the step loop (``--max-batch`` > 1) a forward pass serves several requests: one ``BatchRouted`` per gate
carries each row's tokens. Each request keeps its own history (``RowHistory``, by position in the request, so a
prompt prefilled in chunks continues where its last chunk ended); each row whose history is whole is predicted
(in one call for all rows), a prefill row's targets inside its pass from its last token alone, as if it began a
prompt. The batch's prediction is what the gate of the whole pass will choose: the union of the rows' top-k, each
expert with the probability that at least one row chooses it; the outlook likewise.

Messages of a request (or a batch, keyed by its first request) older than the one in hand are dropped (ids grow,
and a batch's key changes only when the last batch has emptied); a gap in a request's reports (a restarted predictor
joining mid-request) clears its history until the next step. A predictor that falls behind sheds: while newer
reports wait in its inbox it only records routing, and predicts from the newest (a prediction made after its gate
has passed is worth nothing, and the newer one aims further).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from protocol.ids import ExpertId, RequestId
from protocol.messages import BatchRouted, ExpertsPredicted, GateRouted, Message, OutlookPredicted
from shm.layout import ExpertLayout
from training.routing_predictor import RoutingPredictor

log = logging.getLogger(__name__)

HISTORY_TOKENS = 3
"""Tokens of routing a prediction reads: the token and the two before it (``training.routing_predictor._rows``)."""
PREFILL_TOKENS = 4
"""Prompt tokens whose predictions are unioned for a target inside the prefill step."""
KEEP_TOKENS = max(HISTORY_TOKENS, PREFILL_TOKENS)
"""Tokens of routing kept per request, and the most a ``GateRouted`` carries."""
FORGET_PASSES = 64
"""A request not a row of any pass for this many passes is forgotten (under the step loop)."""


class RoutingHistory:
    """One request's last ``KEEP_TOKENS`` tokens of routing, filled gate by gate."""

    def __init__(self, n_layers: int, top_k: int) -> None:
        self.n_layers = n_layers
        self.top_k = top_k
        self.request_id = RequestId(-1)
        self.step = -1
        self.next_layer = -1
        """The layer whose report comes next in the current step (-1: history broken until the next step)."""
        self.step_tokens = 0
        """Tokens in the current step (the prefill's prompt length, else 1)."""
        self.experts = np.zeros((0, n_layers, top_k), dtype=np.int64)  # [T, L, k] local ids, oldest first
        self.token_ids = np.zeros(0, dtype=np.int64)  # [T]

    def record(self, msg: GateRouted) -> bool:
        """Add a gate's report; True if the history is whole up to it (predictions may be made from it)."""
        if msg.request_id != self.request_id:
            self.request_id, self.step, self.next_layer = msg.request_id, -1, -1
            self._clear()
        if msg.step == self.step + 1 and msg.layer == 0 and self.next_layer in (-1, self.n_layers):
            self.step, self.step_tokens = msg.step, msg.n_tokens
            new = np.zeros((len(msg.token_ids), self.n_layers, self.top_k), dtype=np.int64)
            self.experts = np.concatenate([self.experts, new])[-KEEP_TOKENS:]
            self.token_ids = np.concatenate([self.token_ids, np.asarray(msg.token_ids, dtype=np.int64)])[-KEEP_TOKENS:]
            self.next_layer = 0
        if msg.step != self.step or msg.layer != self.next_layer or len(msg.experts) != len(msg.token_ids):
            self.step, self.next_layer = msg.step, -1  # a gap: start again at the next step's first layer
            self._clear()
            return False
        n = len(msg.experts)
        self.experts[-n:, msg.layer] = np.asarray(msg.experts, dtype=np.int64).reshape(n, self.top_k)
        self.next_layer = msg.layer + 1
        return True

    def _clear(self) -> None:
        self.experts = self.experts[:0]
        self.token_ids = self.token_ids[:0]


class RowHistory:
    """One request's last ``KEEP_TOKENS`` tokens of routing under the step loop, filled gate by gate of each pass
    the request is a row of."""

    def __init__(self, n_layers: int, top_k: int) -> None:
        self.n_layers = n_layers
        self.step = -1
        """The last pass the request was a row of."""
        self.next_position = 0
        """Position in the request of the token after the last one recorded."""
        self.next_layer = -1
        """The layer whose report comes next in this pass (-1: broken until the request's next pass)."""
        self.step_tokens = 0
        """The request's tokens in this pass."""
        self.experts = np.zeros((0, n_layers, top_k), dtype=np.int64)  # [T, L, k] local ids, oldest first
        self.token_ids = np.zeros(0, dtype=np.int64)  # [T]

    def record(self, step: int, layer: int, position: int, n_tokens: int, token_ids: list[int],
               experts: list[list[int]]) -> bool:
        """Add this row's report; True if the history is whole up to it."""
        n = len(token_ids)
        if step != self.step and layer == 0:  # the request's next pass begins
            follows = position == self.next_position and self.next_layer == self.n_layers
            if not follows:  # its first pass, or a gap (reports lost, or a chunk longer than reported)
                self.experts, self.token_ids = self.experts[:0], self.token_ids[:0]
            new = np.zeros((n, self.n_layers, self.experts.shape[2]), dtype=np.int64)
            self.experts = np.concatenate([self.experts, new])[-KEEP_TOKENS:]
            self.token_ids = np.concatenate([self.token_ids, np.asarray(token_ids, dtype=np.int64)])[-KEEP_TOKENS:]
            self.step, self.step_tokens, self.next_layer = step, n_tokens, 0
            self.next_position = position + n
        if step != self.step or layer != self.next_layer or len(experts) != n or n == 0:
            self.step, self.next_layer = step, -1
            return False
        self.experts[-n:, layer] = np.asarray(experts, dtype=np.int64).reshape(n, -1)
        self.next_layer = layer + 1
        return True


class LiveRoutingPredictor:
    """``GateRouted`` in, ``ExpertsPredicted`` and ``OutlookPredicted`` out (through ``send``)."""

    def __init__(self, layout: ExpertLayout, predictor: RoutingPredictor, lookahead: int,
                 send: Callable[[Message], None], behind: Callable[[], bool] = lambda: False,
                 clock_ns: Callable[[], int] = time.perf_counter_ns) -> None:
        shape = predictor.shape
        n_layers = len(layout.moe_layers)
        if (shape.n_layers, shape.experts_per_layer, shape.top_k) != (n_layers, layout.experts_per_layer,
                                                                      layout.top_k):
            raise ValueError(f"the routing predictor is for {shape.n_layers} MoE layers x {shape.experts_per_layer} "
                             f"experts (top-{shape.top_k}), the model has {n_layers} x {layout.experts_per_layer} "
                             f"(top-{layout.top_k})")
        self.layout = layout
        self.predictor = predictor
        self.lookahead = lookahead
        self.n_layers = n_layers
        self.send = send
        self.behind = behind
        """True while more messages wait in the inbox: this report's predictions are skipped."""
        self.clock_ns = clock_ns
        self.history = RoutingHistory(n_layers, layout.top_k)
        self.rows: dict[RequestId, RowHistory] = {}
        """Per request of the step loop's passes, its history."""
        self.batch_key = RequestId(-1)
        self.calls = 0
        """Gates predicted from, this request."""
        self.total_ns = 0
        self.max_ns = 0
        self.shed = 0
        """Reports of this request recorded without predicting, because newer ones were waiting."""
        self.dropped = 0
        """Reports of requests older than the one in hand, dropped."""

    def on_gate_routed(self, msg: GateRouted) -> None:
        if msg.request_id < self.history.request_id:
            self.dropped += 1
            return
        if msg.request_id != self.history.request_id:
            self.log_cost()
        if not self.history.record(msg):
            return
        if self.behind():
            self.shed += 1
            return
        started = self.clock_ns()
        self._predict(msg.request_id, msg.step, msg.layer)
        spent = self.clock_ns() - started
        self.calls += 1
        self.total_ns += spent
        self.max_ns = max(self.max_ns, spent)

    def on_batch_routed(self, msg: BatchRouted) -> None:
        if msg.request_id < self.batch_key:
            self.dropped += 1
            return
        if msg.request_id != self.batch_key:  # a new batch (the last one emptied): its passes count from 0 again
            self.log_cost()
            self.batch_key = msg.request_id
            self.rows.clear()
        whole: list[RowHistory] = []
        for i, request in enumerate(msg.requests):
            row = self.rows.get(request)
            if row is None:
                row = self.rows[request] = RowHistory(self.n_layers, self.layout.top_k)
            if row.record(msg.step, msg.layer, msg.positions[i], msg.n_tokens[i], msg.token_ids[i], msg.experts[i]):
                whole.append(row)
        if msg.layer == 0:  # requests that left the batch long ago (finished or cancelled) are forgotten
            for request in [r for r, row in self.rows.items() if row.step < msg.step - FORGET_PASSES]:
                del self.rows[request]
        if not whole:
            return
        if self.behind():
            self.shed += 1
            return
        started = self.clock_ns()
        self._predict_batch(msg.request_id, msg.step, msg.layer, whole)
        spent = self.clock_ns() - started
        self.calls += 1
        self.total_ns += spent
        self.max_ns = max(self.max_ns, spent)

    def _predict_batch(self, batch_key: RequestId, step: int, layer: int, rows: list[RowHistory]) -> None:
        """One prediction and one outlook for the pass, from every row whose history is whole."""
        ahead = layer + self.lookahead
        target = (step + ahead // self.n_layers, ahead % self.n_layers)
        experts = np.zeros((len(rows), HISTORY_TOKENS, self.n_layers, self.layout.top_k), dtype=np.int64)
        token_ids = np.zeros((len(rows), HISTORY_TOKENS), dtype=np.int64)
        known = np.zeros(len(rows), dtype=np.int64)  # [R] real tokens of each left-padded window
        for i, row in enumerate(rows):
            n = min(len(row.token_ids), HISTORY_TOKENS)
            experts[i, HISTORY_TOKENS - n:] = row.experts[-n:]
            token_ids[i, HISTORY_TOKENS - n:] = row.token_ids[-n:]
            known[i] = n
        # a prefill row's target inside its pass: its earlier tokens' later layers are not known yet
        inside = np.array([row.step_tokens > 1 and target[0] == step for row in rows])
        near_p = self.predictor.predict_windows(experts, token_ids, np.where(inside, 1, known), layer,
                                                self.lookahead)  # [R, E]
        outlook_p = self.predictor.predict_windows(experts, token_ids, known, layer, self.n_layers)  # [R, E]
        named = np.unique(np.argsort(-near_p, axis=1, kind="stable")[:, : self.layout.top_k])
        any_p = 1.0 - np.prod(1.0 - near_p, axis=0)  # [E] at least one row chooses it
        chosen = sorted(named.tolist(), key=lambda e: (-any_p[e], e))
        self.send(ExpertsPredicted(
            request_id=batch_key, step=target[0], layer=target[1],
            experts=[ExpertId(self.layout.expert_id(target[1], e)) for e in chosen],
            probabilities=[float(any_p[e]) for e in chosen]))
        outlook = 1.0 - np.prod(1.0 - outlook_p, axis=0)
        self.send(OutlookPredicted(request_id=batch_key, step=step + 1, layer=layer,
                                   probabilities=[float(x) for x in outlook]))

    def log_cost(self) -> None:
        """Log the last request's (or batch's, keyed by its first request) prediction cost (called when the next
        begins, and at shutdown)."""
        if self.calls:
            key = max(self.history.request_id, self.batch_key)
            log.info("request %d: %d routing predictions, %.0f us each on average, %.0f us at most; %d gate(s) "
                     "skipped while behind", key, self.calls, self.total_ns / self.calls / 1e3, self.max_ns / 1e3,
                     self.shed)
        self.calls = self.total_ns = self.max_ns = self.shed = 0

    def _predict(self, request_id: RequestId, step: int, layer: int) -> None:
        h = self.history
        ahead = layer + self.lookahead
        target = (step + ahead // self.n_layers, ahead % self.n_layers)
        window = slice(-HISTORY_TOKENS, None)
        inside_prefill = h.step_tokens > 1 and target[0] == step
        distances = (self.n_layers,) if inside_prefill else tuple(dict.fromkeys((self.lookahead, self.n_layers)))
        probs = self.predictor.predict_at(h.experts[window], h.token_ids[window], layer, distances)
        if inside_prefill:
            experts, chosen_p = self._union_over_prompt(layer)
        else:
            p = probs[self.lookahead]
            experts = np.argsort(-p, kind="stable")[: self.layout.top_k]
            chosen_p = p[experts]
        self.send(ExpertsPredicted(
            request_id=request_id, step=target[0], layer=target[1],
            experts=[ExpertId(self.layout.expert_id(target[1], int(e))) for e in experts],
            probabilities=[float(x) for x in chosen_p]))
        self.send(OutlookPredicted(request_id=request_id, step=step + 1, layer=layer,
                                   probabilities=[float(x) for x in probs[self.n_layers]]))

    def _union_over_prompt(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Local experts (most likely first) and their probability of being chosen by any of the last prompt
        tokens, each predicted as if it began a prompt."""
        h = self.history
        none_p = np.ones(self.layout.experts_per_layer)  # [E] probability that no token chooses each expert
        named: set[int] = set()
        for i in range(max(0, len(h.token_ids) - min(PREFILL_TOKENS, h.step_tokens)), len(h.token_ids)):
            p = self.predictor.predict_at(h.experts[i: i + 1], h.token_ids[i: i + 1], layer, (self.lookahead,))
            q = p[self.lookahead]
            none_p *= 1.0 - q
            named.update(np.argsort(-q, kind="stable")[: self.layout.top_k].tolist())
        any_p = 1.0 - none_p
        experts = np.array(sorted(named, key=lambda e: (-any_p[e], e)), dtype=np.int64)
        return experts, any_p[experts]


@dataclass(frozen=True)
class PassRow:
    """One request's part of a forward pass of the step loop."""

    request_id: RequestId
    first_position: int
    """Position in the request (prompt, then generated tokens) of the row's first token in the pass."""
    token_ids: list[int]
    """The model's ids of the row's tokens in the pass."""
    token_index: list[int]
    """Where each of them is in the pass's flattened ``[T]`` tokens."""


class RoutingFeed:
    """Inference side: at every gate, one ``GateRouted`` with the routing and ids of the step's last tokens."""

    def __init__(self, send: Callable[[Message], None], enabled: bool) -> None:
        self.send = send
        self.enabled = enabled
        """Off while predictions do not drive loads (``ConfigureInference.hidden_states``)."""
        self.request_id = RequestId(0)
        self.token_ids: list[int] = []
        """The request's prompt, then each generated token as it is generated (step ``s`` feeds the one of ``s-1``)."""
        self.prompt_tokens = 0
        self.rows: list[PassRow] | None = None
        """The rows of the step loop's current forward pass (None: ``generate()`` serves one request)."""
        self.batch_key = RequestId(0)
        """The key the current pass's gates are reported under (the batch's first request)."""

    def begin_pass(self, batch_key: RequestId, rows: list[PassRow]) -> None:
        """The step loop's next forward pass serves ``rows`` and reports its gates under ``batch_key``."""
        self.batch_key, self.rows = batch_key, rows

    def end_pass(self) -> None:
        """The pass is over (until the next ``begin_pass``, reports are ``generate()``'s)."""
        self.rows = None

    def begin_request(self, request_id: RequestId, prompt_ids: list[int]) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.prompt_tokens = len(prompt_ids)

    def on_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def on_routing(self, moe_layer: int, step: int, top_k_index: torch.Tensor, hidden: torch.Tensor) -> None:
        """The backend's hook: the gate of ``moe_layer`` at ``step`` routed ``top_k_index [T, k]``."""
        if not self.enabled:
            return
        if self.rows is not None:
            self._send_pass(moe_layer, step, top_k_index)
            return
        first = 0 if step == 0 else self.prompt_tokens + step - 1
        ids = self.token_ids[first: self.prompt_tokens if step == 0 else first + 1]
        n = int(top_k_index.shape[0])
        if n != len(ids):  # not a step as this request feeds it: nothing sound to report
            log.debug("step %d routed %d tokens, expected %d: not reported", step, n, len(ids))
            return
        keep = min(n, KEEP_TOKENS)
        self.send(GateRouted(request_id=self.request_id, step=step, layer=moe_layer, n_tokens=n,
                             token_ids=ids[-keep:], experts=top_k_index[-keep:].tolist()))

    def _send_pass(self, moe_layer: int, step: int, top_k_index: torch.Tensor) -> None:
        """One ``BatchRouted``: each row's last ``KEEP_TOKENS`` tokens of the pass."""
        rows = self.rows
        assert rows is not None
        chosen = top_k_index.tolist()  # [T][k] of the flattened pass
        n_sent = [min(len(row.token_ids), KEEP_TOKENS) for row in rows]
        self.send(BatchRouted(
            request_id=self.batch_key, step=step, layer=moe_layer, requests=[row.request_id for row in rows],
            positions=[row.first_position + len(row.token_ids) - n for row, n in zip(rows, n_sent, strict=True)],
            n_tokens=[len(row.token_ids) for row in rows],
            token_ids=[row.token_ids[-n:] for row, n in zip(rows, n_sent, strict=True)],
            experts=[[chosen[i] for i in row.token_index[-n:]] for row, n in zip(rows, n_sent, strict=True)]))
