"""The predictor worker process (``promoe::predictor``): at each MoE layer boundary it reads the layer's input from
the hidden-state exchange (shared memory), predicts the experts of the layer ``lookahead`` MoE layers further on
(wrapping into the first layers of the next token), and sends the prediction one-way to the coordinator.

With ``--predictor`` it uses the learned MLP of (source layer, lookahead) from ``--train-predictor``; without one
(or for a pair the file lacks) it falls back to skip-layer gate reuse: the source layer's input fed to the target
layer's own gate. Either way the prediction is the union of each token's top-k.

With ``--routing-predictor`` it reads no hidden state: it predicts from the gates' routing and the token ids
(``GateRouted``), and also sends the outlook of each layer one token on (``workers/routing_live.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_router_weights, open_checkpoint
from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, RequestId
from protocol.messages import BatchRouted, ExpertsPredicted, GateRouted, HiddenStateWritten, Message, Ping
from shm.hidden_exchange import HiddenExchange
from shm.layout import ExpertLayout
from shm.segment import Segment
from training.predictor_training import LearnedPredictor
from training.routing_predictor import RoutingPredictor
from workers.bootstrap import WorkerSockets, run_worker, send
from workers.routing_live import LiveRoutingPredictor

log = logging.getLogger(__name__)


class GateReusePredictor:
    """Skip-layer gate reuse: ``top_k(hidden @ router[target].T)`` per token, unioned over tokens."""

    def __init__(self, routers: torch.Tensor, top_k: int) -> None:
        self.routers = routers  # [n_moe_layers, E, H]
        self.top_k = top_k

    def predict(self, hidden: torch.Tensor, target_layer: int) -> list[int]:
        logits = hidden.float() @ self.routers[target_layer].T  # [n, E]
        top = torch.topk(logits, self.top_k, dim=-1).indices  # [n, k]
        return sorted(set(top.flatten().tolist()))


def target_of(step: int, layer: int, lookahead: int, n_layers: int) -> tuple[int, int]:
    """The (step, MoE layer) ``lookahead`` layers after (step, layer); past the last layer, the next token's."""
    ahead = layer + lookahead
    return (step + ahead // n_layers, ahead % n_layers)


class Predictor:
    def __init__(self, layout: ExpertLayout, exchange: HiddenExchange, model: GateReusePredictor, lookahead: int,
                 send_to_coordinator: Any, learned: LearnedPredictor | None = None) -> None:
        self.layout = layout
        self.exchange = exchange
        self.model = model
        self.learned = learned
        self.lookahead = lookahead
        self.send_to_coordinator = send_to_coordinator
        self.stale = 0

    def on_hidden_state_written(self, msg: HiddenStateWritten) -> None:
        rows = self.exchange.read(msg.layer, msg.request_id, msg.step)  # [n, H]
        if rows is None:
            self.stale += 1  # overwritten already: that layer is past
            return
        step, layer = target_of(msg.step, msg.layer, self.lookahead, len(self.layout.moe_layers))
        local = None if self.learned is None else self.learned.predict(rows, msg.layer, self.lookahead)
        if local is None:
            local = self.model.predict(rows, layer)
        experts = [ExpertId(self.layout.expert_id(layer, e)) for e in local]
        send(self.send_to_coordinator, ExpertsPredicted(request_id=RequestId(msg.request_id), step=step,
                                                        layer=layer, experts=experts))


def serve_routing(cfg: RuntimeConfig, sockets: WorkerSockets, path: str) -> None:
    """``--routing-predictor``: predictions from ``GateRouted`` (no hidden states, no router weights)."""
    live = LiveRoutingPredictor(cfg.layout, RoutingPredictor.load(Path(path)), cfg.lookahead,
                                lambda msg: send(sockets.send_to_coordinator, msg),
                                behind=lambda: bool(sockets.inbox.deferred or sockets.inbox.poller.poll(0)))
    log.info("predicting with the routing predictor %s, %d layer(s) ahead, and each layer's outlook one token on",
             path, cfg.lookahead)
    sockets.announce_ready()
    try:
        sockets.serve({Ping: sockets.answer_ping, GateRouted: live.on_gate_routed,
                       BatchRouted: live.on_batch_routed})
    finally:
        live.log_cost()


def serve(cfg: RuntimeConfig, sockets: WorkerSockets) -> None:
    torch.set_num_threads(1)
    if cfg.routing_predictor_path is not None:
        serve_routing(cfg, sockets, cfg.routing_predictor_path)
        return
    lay = cfg.layout
    learned = None
    if cfg.predictor_path is not None:
        learned = LearnedPredictor(Path(cfg.predictor_path), lay.hidden_size, lay.experts_per_layer)
        log.info("predicting with the learned predictor %s, %d layer(s) ahead", cfg.predictor_path, cfg.lookahead)
    else:
        log.info("no trained predictor given: predicting by skip-layer gate reuse, %d layer(s) ahead", cfg.lookahead)
    routers = load_router_weights(open_checkpoint(cfg.checkpoint), lay)
    exchange = HiddenExchange(Segment.attach(cfg.segment("hidden")), len(lay.moe_layers), lay.hidden_size,
                              cfg.hidden_max_tokens)
    try:
        predictor = Predictor(lay, exchange, GateReusePredictor(routers, lay.top_k), cfg.lookahead,
                              sockets.send_to_coordinator, learned)
        handlers: dict[type[Message], Any] = {Ping: sockets.answer_ping,
                                              HiddenStateWritten: predictor.on_hidden_state_written}
        sockets.announce_ready()
        sockets.serve(handlers)
    finally:
        exchange.close()


def main(argv: list[str] | None = None) -> None:
    run_worker("predictor", argv, serve)


if __name__ == "__main__":
    main()
