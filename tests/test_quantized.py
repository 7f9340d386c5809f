"""Quantized experts (``--expert-dtype int8|int4``): the format, its byte counts, the copy of its chunks, and the
oracle: the runtime gives the greedy tokens of transformers computing with exactly the dequantized experts."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path

import pytest
import torch

from protocol.ids import ExpertId, SlotId
from shm import quantized
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.layout import ExpertLayout
from shm.segment import Segment
from tests.conftest import NEW_TOKENS, PROMPT_IDS, PROMPT_TEXT
from workers.copy_engine import CpuCopyEngine

INTER, HIDDEN, GROUP = 64, 128, 64


def _layout(storage: str, n_chunks: int = 3, group_size: int = GROUP, compute: str = "float32") -> ExpertLayout:
    return ExpertLayout(moe_layers=(0, 1), experts_per_layer=4, top_k=2, hidden_size=HIDDEN, intermediate_size=INTER,
                        storage_dtype=storage, compute_dtype=compute, n_chunks=n_chunks, n_slots=4,
                        group_size=group_size)


# ---------------------------------------------------------------- format
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_within_half_a_step(bits: int) -> None:
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits)) * 0.05
    weight[3, :GROUP] = 0.0  # an all-zero group: scale 0, codes 0, exact
    weight[5, 7] = 4.0  # an outlier widens only its own group's step
    codes, scales = quantized.quantize(weight, bits, GROUP)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (32, 256 * bits // 8)
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (32, 256 // GROUP)
    back = quantized.dequantize(codes, scales, bits, GROUP, torch.float32)
    step = scales.float().repeat_interleave(GROUP, dim=1)  # [32, 256]: each weight's group scale
    # |w - q*s| <= s/2 (rounding), plus the float16 rounding of s times |q| <= qmax
    bound = step / 2 + quantized.qmax(bits) * step * 2**-11 + 1e-12
    assert bool(((weight - back).abs() <= bound).all())
    assert bool((back[3, :GROUP] == 0).all())
    assert float((weight - back)[5, GROUP:].abs().max()) < 0.05 * 2 / quantized.qmax(bits)  # other groups unaffected
    relative = float((weight - back)[6:].norm() / weight[6:].norm())  # gaussian rows: ~step / sqrt(12) / std
    assert relative < (0.01 if bits == 8 else 0.15)


def test_int4_packs_two_codes_per_byte_first_half_in_the_low_nibbles() -> None:
    codes = torch.tensor([[-7, 7, 0, -1, 3, -3, 1, 2]], dtype=torch.int8)
    packed = quantized.pack(codes, 4)
    assert packed.tolist() == [[(3 + 8) << 4 | 1, (-3 + 8) << 4 | 15, (1 + 8) << 4 | 8, (2 + 8) << 4 | 7]]
    assert torch.equal(quantized.unpack(packed, 4), codes)
    assert torch.equal(quantized.unpack(quantized.pack(codes, 8), 8), codes)


@pytest.mark.parametrize(("storage", "ratio"), [("int8", (64 + 2) / 128), ("int4", (32 + 2) / 128)])
def test_nbytes_count_codes_and_scales(storage: str, ratio: float) -> None:
    lay = _layout(storage)
    dense = _layout("bfloat16")
    per_matrix = INTER * HIDDEN * {"int8": 1, "int4": 0.5}[storage] + INTER * (HIDDEN // GROUP) * 2  # gate/up: [I, H]
    assert lay.expert_nbytes == 3 * per_matrix  # down [H, I]: as many weights, and I / GROUP groups of H rows
    assert lay.expert_nbytes == pytest.approx(ratio * dense.expert_nbytes)
    assert lay.slot_nbytes == lay.expert_nbytes  # the slots hold the quantized bytes, whatever the compute dtype
    assert lay.row_numel == lay.expert_nbytes and lay.store_itemsize == 1
    sections = lay.quantized_sections()
    assert [offset for offset, _ in sections.values()] == [0, *accumulate(
        nbytes for _, nbytes in list(sections.values())[:-1])]
    assert sum(hi - lo for lo, hi in map(lay.chunk_bounds, range(lay.n_chunks))) == lay.expert_nbytes
    assert ExpertLayout.from_json(lay.to_json()) == lay
    with pytest.raises(ValueError, match="group size"):
        _layout(storage, group_size=48)  # does not divide INTER = 64


@pytest.mark.parametrize("storage", ["int8", "int4"])
@pytest.mark.parametrize("n_chunks", [1, 3, 7])
def test_chunks_copy_the_quantized_bytes_and_slots_dequantize(storage: str, n_chunks: int) -> None:
    lay = _layout(storage, n_chunks=n_chunks)
    store = HostExpertStore(Segment.private(HostExpertStore.nbytes_for(lay)), lay)
    slots = CacheSlots(Segment.private(CacheSlots.nbytes_for(lay)), lay)
    generator = torch.Generator().manual_seed(n_chunks)
    weights = {}
    for e in range(lay.n_experts):
        weights[e] = (torch.randn(INTER, HIDDEN, generator=generator), torch.randn(INTER, HIDDEN, generator=generator),
                      torch.randn(HIDDEN, INTER, generator=generator))
        for which, tensor in zip(("gate", "up", "down"), weights[e], strict=True):
            store.write_matrix(ExpertId(e), which, tensor)
    engine = CpuCopyEngine(store, slots, link_gbps=None)
    total = sum(engine.copy_chunk(ExpertId(5), SlotId(2), chunk) for chunk in range(n_chunks))
    assert total == lay.expert_nbytes
    assert torch.equal(slots.slots[2], store.experts[5])
    gate, up, down = weights[5]
    expected_gate_up, expected_down = quantized.dequantized_expert(store.experts[5], lay, torch.float32)
    assert torch.equal(slots.gate_up(SlotId(2)), expected_gate_up)
    assert torch.equal(slots.down(SlotId(2)), expected_down)
    tolerance = {"int8": 0.05, "int4": 0.8}[storage]  # half a step of randn groups (max |w| ~ 3-4)
    assert float((expected_gate_up - torch.cat([gate, up])).abs().max()) < tolerance
    assert float((expected_down - down).abs().max()) < tolerance
    with pytest.raises(ValueError, match="quantized"):
        store.matrix(ExpertId(0), "gate")
    slots.close()
    store.close()


# ---------------------------------------------------------------- oracle
@pytest.fixture(scope="module")
def dequantized_reference(checkpoint: Path, reference: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    """Greedy tokens of transformers (eager experts, float32) with every expert replaced by its dequantized
    values, per expert dtype; ``none``: unquantized (conftest's ``reference``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.checkpoint import open_checkpoint
    from models.quantized_reference import use_dequantized_experts

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    out = {"none": reference}
    for dtype in ("int8", "int4"):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager")
        use_dequantized_experts(model, open_checkpoint(checkpoint).layout(4, 1, "float32", expert_dtype=dtype))
        out[dtype] = {}
        for name, ids in (("text", tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]), ("ids", PROMPT_IDS)):
            prompt = torch.tensor([ids])
            generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                       do_sample=False)
            out[dtype][name] = generated[0, len(ids):].tolist()
    return out


def test_int4_changes_the_reference(dequantized_reference: dict[str, dict[str, list[int]]]) -> None:
    """The oracle below can tell quantized from unquantized experts: int4 changes the greedy tokens."""
    assert dequantized_reference["int4"] != dequantized_reference["none"]


@pytest.mark.parametrize(("dtype", "policy", "cache_experts"), [
    ("int4", "lru", 8), ("int4", "promoe", 8), ("int8", "lru", 8), ("int8", "promoe", 8),
])
def test_runtime_matches_dequantized_transformers(runtime_keeper, checkpoint, dequantized_reference, dtype, policy,
                                                  cache_experts):
    flags = ("--expert-dtype", dtype, "--policy", "lru", "--cache-experts", "8", "--link-gbps", "20")
    rt = runtime_keeper.serving(checkpoint, flags, policy, cache_experts)
    with rt.client() as client:
        by_ids = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        by_text = client.generate(prompt=PROMPT_TEXT, max_new_tokens=NEW_TOKENS)
    assert by_ids.token_ids == dequantized_reference[dtype]["ids"]
    assert by_text.token_ids == dequantized_reference[dtype]["text"]
    lay = ExpertLayout(moe_layers=tuple(range(6)), experts_per_layer=32, top_k=4, hidden_size=256,
                       intermediate_size=256, storage_dtype=dtype, compute_dtype="float32", n_chunks=3, n_slots=8)
    for done in (by_ids, by_text):
        assert done.metrics["experts_loaded"] > 0
        assert done.metrics["bytes_loaded"] == done.metrics["experts_loaded"] * lay.expert_nbytes
    assert lay.expert_nbytes == 3 * 256 * 256 * {"int8": 1, "int4": 0.5}[dtype] + 3 * 256 * 4 * 2
