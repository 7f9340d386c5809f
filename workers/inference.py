"""The inference worker process (``promoe::inference``): the transformers model without its experts, plus the
experts backend that computes them from the cache slots. Runs one request at a time with ``generate()``, or with
``--max-batch`` > 1 several together in the step loop of ``workers/step_loop.py``.

Per layer it sends one one-way ``GateDecided``; per token one ``TokenStreamed``. It never waits for a reply:
readiness comes from the slot table. It answers the coordinator's pings between tokens and from the per-layer
path, so that a long prefill or a token with long waits for experts is not taken for a hung worker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq
from transformers import StoppingCriteria, StoppingCriteriaList

from models.checkpoint import open_checkpoint
from models.skeleton import build_skeleton, experts_modules
from models.text import IncrementalDetokenizer, NoChatTemplate, encode_prompt, load_tokenizer
from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, RequestId
from protocol.messages import (
    CancelGeneration,
    ConfigureInference,
    ExpertsReleased,
    GateDecided,
    GenerationFailed,
    GenerationFinished,
    HiddenStateWritten,
    Ping,
    StartGeneration,
    TokenStreamed,
)
from shm.cache_slots import CacheSlots, SlotArray
from shm.hidden_exchange import HiddenExchange
from shm.host_exchange import HostExchange
from shm.layout import torch_dtype
from shm.segment import Segment
from shm.slot_table import SlotTable
from workers.bootstrap import KeepAlive, WorkerSockets, now_ns, push_socket, run_worker, send
from workers.host_experts import HostOutputs
from workers.offloaded_experts import IMPLEMENTATION_NAME, LoadTimedOut, OffloadedExperts
from workers.routing_live import RoutingFeed
from workers.trace_recorder import TraceRecorder

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request cannot be run as given (recoverable: the client gets the message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenStreamer:
    """transformers streamer: forwards each new token one-way and timestamps the first and the last."""

    def __init__(self, request_id: RequestId, send_to_coordinator: zmq.Socket, tokenizer: Any,
                 on_token: Callable[[int], None] | None = None) -> None:
        self.request_id = request_id
        self.on_token = on_token
        """Called with each generated id (the routing feed's token ids)."""
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.send_to_coordinator = send_to_coordinator
        self.prompt_seen = False
        self.count = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        stamp = time.perf_counter_ns()
        if self.first_ns is None:
            self.first_ns = stamp
        self.last_ns = stamp
        for token in value.reshape(-1).tolist():
            if self.on_token is not None:
                self.on_token(int(token))
            text = self.detokenizer.push(int(token)) if self.detokenizer is not None else ""
            send(self.send_to_coordinator, TokenStreamed(request_id=self.request_id, index=self.count,
                                                         token_id=int(token), text=text))
            self.count += 1

    def end(self) -> None:
        pass


class CancelCheck(StoppingCriteria):
    """transformers stopping criterion: between tokens, drain the inbox without blocking and stop if the
    coordinator sent ``CancelGeneration`` for this request.

    Why a message and not a flag in shared memory: the inbox is already there and ordered with every other command
    (a cancel can never overtake the ``StartGeneration`` it refers to, nor leak into the next request), and the
    check is one zero-timeout poll per token (microseconds; never a round trip). Pings are answered here and, within
    a token, from the experts backend's per-layer path (``KeepAlive``), which defers what else it finds: a cancel
    it took out early is looked for among the deferred messages. Anything else is left to the serve loop.
    """

    def __init__(self, request_id: RequestId, sockets: WorkerSockets) -> None:
        self.request_id = request_id
        self.sockets = sockets
        self.cancelled = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.sockets.answer_pings()
        for msg in self.sockets.inbox.take_deferred(CancelGeneration):
            assert isinstance(msg, CancelGeneration)
            if msg.request_id == self.request_id:  # a stale cancel of an earlier request: ignored
                self.cancelled = True
        return torch.full((input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device)


class InferenceWorker:
    def __init__(self, model: Any, tokenizer: Any, backend: OffloadedExperts, sockets: WorkerSockets,
                 recorder: TraceRecorder | None = None, feed: RoutingFeed | None = None) -> None:
        self.model = model
        self.recorder = recorder
        """``--record-trace``: every request's routing, appended to a trace file."""
        self.feed = feed
        """``--routing-predictor``: every gate's routing, to the predictor."""
        self.tokenizer = tokenizer
        self.backend = backend
        self.sockets = sockets
        self.send_to_coordinator = sockets.send_to_coordinator
        self.vocab_size = int(model.config.vocab_size)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 62)
        self.device = next(model.parameters()).device

    def on_start_generation(self, msg: StartGeneration) -> None:
        """Run the request and report how it ended; its pins are cleared before the report goes out, so the
        coordinator never handles the end of a request while a pin of it is still set."""
        result: GenerationFinished | GenerationFailed
        try:
            result = self.generate(msg)
        except BadRequest as exc:
            result = GenerationFailed(request_id=msg.request_id, code=exc.code, message=str(exc))
        except Exception as exc:  # the worker survives a failing request; the client hears why
            code, message = failure(exc, f"request {msg.request_id}")
            result = GenerationFailed(request_id=msg.request_id, code=code, message=message)
        finally:
            self.backend.table.clear_pins()
        send(self.send_to_coordinator, result)

    def on_cancel_generation(self, msg: CancelGeneration) -> None:
        log.debug("cancel of request %d, which is no longer running", msg.request_id)

    def check_ids(self, ids: list[int], what: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise BadRequest("bad_token_ids", f"{what} {bad[:5]} outside the vocabulary 0..{self.vocab_size - 1}")

    def prompt_ids(self, msg: StartGeneration) -> list[int]:
        if msg.prompt_ids is not None:
            if msg.chat:
                raise BadRequest("bad_request", "chat needs a text prompt, not prompt_ids")
            ids = list(msg.prompt_ids)
            self.check_ids(ids, "token ids")
        elif msg.prompt is not None:
            if self.tokenizer is None:
                raise BadRequest("no_tokenizer", "this checkpoint has no tokenizer: send prompt_ids")
            try:
                ids = encode_prompt(self.tokenizer, msg.prompt, msg.chat)
            except NoChatTemplate as exc:
                raise BadRequest("no_chat_template", str(exc)) from None
        else:
            raise BadRequest("bad_request", "give prompt or prompt_ids")
        if not ids:
            raise BadRequest("bad_request", "the prompt is empty")
        new_tokens = msg.params.max_new_tokens
        if len(ids) + new_tokens > self.max_positions:
            raise BadRequest("bad_request", f"{len(ids)} prompt tokens + {new_tokens} new tokens exceed the "
                                            f"model's {self.max_positions} positions")
        return ids

    def generate(self, msg: StartGeneration) -> GenerationFinished:
        ids = self.prompt_ids(msg)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, prompt_tokens]
        params = msg.params
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens}
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            torch.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"))
        else:
            kwargs.update(do_sample=False)
        model_eos = self.model.generation_config.eos_token_id
        if self.model.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = model_eos if isinstance(model_eos, int) else 0
        stop_ids = self.stop_ids(msg, model_eos)
        if stop_ids:  # transformers' own end-of-sequence handling: it stops right after any of these ids
            kwargs["eos_token_id"] = sorted(stop_ids)
        streamer = self.streamer(msg.request_id)
        cancel = CancelCheck(msg.request_id, self.sockets)
        self.backend.begin_request(msg.request_id)
        if self.recorder is not None:
            self.recorder.begin_request()
        if self.feed is not None:
            self.feed.begin_request(msg.request_id, ids)
        started = time.perf_counter_ns()
        with torch.inference_mode():
            output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                         stopping_criteria=StoppingCriteriaList([cancel]), **kwargs)
        new_ids = output[0, len(ids):].tolist()
        if self.recorder is not None:
            self.recorder.end_request(ids, new_ids)
        if cancel.cancelled:
            finish_reason = "cancelled"
        elif new_ids and new_ids[-1] in stop_ids:
            finish_reason = "stop"
        else:
            finish_reason = "length"
        stats = self.backend.stats
        return self.finished(msg.request_id, len(ids), new_ids, started, streamer, finish_reason, stats.stall_ns,
                             stats.uses, stats.hits, stats.host_experts)

    def finished(self, request_id: RequestId, prompt_tokens: int, new_ids: list[int], started_ns: int,
                 streamer: TokenStreamer, reason: str, stall_ns: int, uses: int, hits: int,
                 host_experts: int = 0) -> GenerationFinished:
        """How a request ended: its tokens, text and timings (TTFT from ``started_ns``, TPOT between its first and
        last streamed token) and its expert counters."""
        first = streamer.first_ns or time.perf_counter_ns()
        last = streamer.last_ns or first
        return GenerationFinished(
            request_id=request_id,
            token_ids=new_ids,
            text=self.tokenizer.decode(new_ids) if self.tokenizer is not None else None,
            prompt_tokens=prompt_tokens,
            ttft_ms=(first - started_ns) / 1e6,
            tpot_ms=(last - first) / 1e6 / max(len(new_ids) - 1, 1),
            stall_ms=stall_ns / 1e6,
            expert_uses=uses,
            expert_hits=hits,
            finish_reason=reason,
            host_experts=host_experts,
        )

    def streamer(self, request_id: RequestId) -> TokenStreamer:
        return TokenStreamer(request_id, self.send_to_coordinator, self.tokenizer,
                             self.feed.on_token if self.feed is not None else None)

    def stop_ids(self, msg: StartGeneration, model_eos: int | list[int] | None) -> set[int]:
        """The request's stop ids and the model's own end-of-sequence ids."""
        stop = set(msg.params.stop_ids or ())
        self.check_ids(sorted(stop), "stop_ids")
        if isinstance(model_eos, int):
            stop.add(model_eos)
        elif model_eos:
            stop.update(model_eos)
        return stop


def open_slots(cfg: RuntimeConfig, sockets: WorkerSockets) -> tuple[SlotArray, zmq.Socket | None]:
    """CPU: attach the shared slot segment. CUDA: allocate the slots on the GPU once and export them to the loader
    (one ``SlotsExported``; the socket stays open until shutdown so that the message is never dropped unsent)."""
    if cfg.device != "cuda":
        return CacheSlots(Segment.attach(cfg.segment("slots")), cfg.layout), None
    from workers.gpu_slots import GpuSlots

    gpu_slots = GpuSlots.allocate(cfg.layout, torch.device("cuda", torch.cuda.current_device()))
    send_to_loader = push_socket(sockets.ctx, cfg.endpoint("loader"))
    send(send_to_loader, gpu_slots.export())
    return gpu_slots, send_to_loader


def open_table(cfg: RuntimeConfig) -> SlotTable:
    """Attach the slot table and clear every pin: a predecessor that died mid-request leaves its pins set, and this
    worker is their only writer. Done before the worker reports ready, so before its first request."""
    lay = cfg.layout
    table = SlotTable(Segment.attach(cfg.segment("table")), lay.n_slots, lay.n_experts, lay.n_chunks, init=False)
    table.clear_pins()
    return table


def failure(exc: Exception, who: str) -> tuple[str, str]:
    """Log why ``who`` (a request, or a batch's requests) failed; the code and message its clients get."""
    if isinstance(exc, LoadTimedOut):
        log.error("%s: %s", who, exc)
        return "load_timeout", str(exc)
    log.exception("%s failed", who, exc_info=exc)
    return "internal", f"{type(exc).__name__}: {exc}"


def open_host_exchange(cfg: RuntimeConfig) -> HostExchange:
    lay = cfg.layout
    return HostExchange(Segment.attach(cfg.segment("host")), len(lay.moe_layers), lay.experts_per_layer, lay.top_k,
                        lay.hidden_size, cfg.host_max_tokens)


def serve(cfg: RuntimeConfig, sockets: WorkerSockets) -> None:
    lay = cfg.layout
    slots, send_to_loader = open_slots(cfg, sockets)
    table = open_table(cfg)
    hidden_exchange = HiddenExchange(Segment.attach(cfg.segment("hidden")), len(lay.moe_layers), lay.hidden_size,
                                     cfg.hidden_max_tokens)
    host = HostOutputs(open_host_exchange(cfg)) if cfg.host_compute != "never" else None
    send_to_coordinator = sockets.send_to_coordinator
    send_to_predictor = push_socket(sockets.ctx, cfg.endpoint("predictor"))
    recorder: TraceRecorder | None = None
    try:
        ckpt = open_checkpoint(cfg.checkpoint)
        model = build_skeleton(ckpt, torch_dtype(lay.compute_dtype), lay.moe_layers)
        if cfg.device == "cuda":
            model.to(slots.slots.device)
        tokenizer = load_tokenizer(ckpt.path)

        def on_gate(request_id: int, moe_layer: int, step: int, experts: list[ExpertId],
                    ready: list[ExpertId]) -> None:
            msg = GateDecided(request_id=RequestId(request_id), step=step, layer=moe_layer, experts=experts,
                              ready_experts=ready, sent_ns=now_ns(),
                              request_ids=[RequestId(r) for r in backend.request_ids])
            publishing = backend.host  # host compute on (configure_cache may turn it off and on)
            if publishing is not None:
                msg.n_tokens, msg.host_input = publishing.n_tokens, publishing.published
                msg.device_ns, msg.device_experts = publishing.take_device_time()
            send(send_to_coordinator, msg)

        def on_released(experts: list[ExpertId]) -> None:
            send(send_to_coordinator, ExpertsReleased(experts=experts))

        def on_hidden(request_id: int, moe_layer: int, step: int, hidden: torch.Tensor) -> None:
            n_tokens = hidden_exchange.write(moe_layer, request_id, step, hidden)
            send(send_to_predictor, HiddenStateWritten(request_id=RequestId(request_id), step=step, layer=moe_layer,
                                                       n_tokens=n_tokens))

        feed = None
        if cfg.routing_predictor_path is not None:  # the predictor reads routing, not hidden states
            feed = RoutingFeed(lambda m: send(send_to_predictor, m), cfg.prefetch)
        backend = OffloadedExperts(lay, table, slots, experts_modules(model, lay.moe_layers), on_gate, on_released,
                                   cfg.load_timeout_s, on_hidden if cfg.prefetch and feed is None else None,
                                   reordered=cfg.reordered_inference, keep_alive=KeepAlive(sockets))
        backend.host = host
        backend.register()
        model.set_experts_implementation(IMPLEMENTATION_NAME)  # type: ignore[operator]
        if cfg.record_trace is not None:
            recorder = TraceRecorder(Path(cfg.record_trace), len(lay.moe_layers), lay.experts_per_layer,
                                     cfg.record_hidden, tokenizer)
        hooks = [hook.on_routing for hook in (recorder, feed) if hook is not None]
        if hooks:
            def on_routing(*args: Any) -> None:
                for hook in hooks:
                    hook(*args)

            backend.on_routing = on_routing
        worker = InferenceWorker(model, tokenizer, backend, sockets, recorder, feed)

        def on_configure(msg: ConfigureInference) -> None:  # between requests (configure_cache)
            backend.on_hidden = on_hidden if msg.hidden_states and feed is None else None
            if feed is not None:
                feed.enabled = msg.hidden_states
            backend.reordered = msg.reordered_inference
            backend.host = host if msg.host_inputs else None

        sockets.announce_ready()
        if cfg.max_batch > 1:
            from workers.kv_memory import KvBudget, kv_bytes_per_token, memory_budget_bytes
            from workers.step_loop import StepLoop

            dtype = next(model.parameters()).dtype
            per_token = kv_bytes_per_token(model.config, dtype)

            def kv_budget() -> KvBudget:
                return KvBudget(memory_budget_bytes(worker.device), per_token)

            StepLoop(worker, cfg.max_batch, cfg.prefill_chunk, on_configure, kv_budget).serve()
        sockets.serve({StartGeneration: worker.on_start_generation, Ping: sockets.answer_ping,
                       CancelGeneration: worker.on_cancel_generation, ConfigureInference: on_configure})
    finally:
        if recorder is not None:
            try:
                recorder.flush()
            except OSError as exc:  # a full disk must not hide why the worker stops, nor keep its sockets open
                log.error("could not write the routing trace: %s", exc)
        send_to_predictor.close(linger=0)
        if send_to_loader is not None:
            send_to_loader.close(linger=0)
        slots.close()
        table.close()
        hidden_exchange.close()
        if host is not None:
            host.exchange.close()


def main(argv: list[str] | None = None) -> None:
    run_worker("inference", argv, serve)


if __name__ == "__main__":  # run as ``python -m workers.inference``: serve from the module the step loop imports,
    from workers import inference  # so that its ``BadRequest`` is the class raised here, not a __main__ copy

    inference.main()
