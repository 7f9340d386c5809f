"""Encode and decode time of one per-layer ``GateDecided`` (the hot-path message), through the one codec.

    python bench/wire_codec.py [--messages 20000] [--repeats 15]

Prints microseconds per message for encode and for decode: the median over ``--repeats`` timed loops of
``--messages`` messages each (a Qwen3-30B-A3B-sized gate report: top-8 experts, 5 of them ready).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.codec import decode, encode
from protocol.ids import ExpertId, RequestId
from protocol.messages import GateDecided


def sample() -> GateDecided:
    experts = [ExpertId(e) for e in (6017, 6031, 6040, 6055, 6071, 6092, 6110, 6127)]
    return GateDecided(request_id=RequestId(12345), step=517, layer=47, experts=experts, ready_experts=experts[:5],
                       sent_ns=time.time_ns())


def per_message_us(fn: object, arg: object, n_messages: int, repeats: int) -> float:
    """Median over ``repeats`` loops of the time of one call, in microseconds."""
    call = fn  # type: ignore[assignment]
    times_us = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(n_messages):
            call(arg)  # type: ignore[operator]
        times_us.append((time.perf_counter_ns() - started) / n_messages / 1000)
    return statistics.median(times_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    message = sample()
    wire = encode(message)
    assert decode(wire) == message
    encode_us = per_message_us(encode, message, args.messages, args.repeats)
    decode_us = per_message_us(decode, wire, args.messages, args.repeats)
    print(f"GateDecided ({len(wire)} bytes): encode {encode_us:.2f} us, decode {decode_us:.2f} us "
          f"(median of {args.repeats} x {args.messages} messages)")


if __name__ == "__main__":
    main()
