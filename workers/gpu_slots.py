"""The CUDA path's cache slots: allocated once in the inference worker's GPU memory, exported once to the loader.

The inference worker allocates one tensor ``[n_slots, row_numel]`` at start-up and never frees or resizes it
while the runtime lives. It exports the tensor's storage with torch's own CUDA IPC primitive
(``UntypedStorage._share_cuda_``) and sends the eight values of that tuple as the typed fields of
``SlotsExported`` (no pickle). The loader rebuilds the storage with ``UntypedStorage._new_shared_cuda`` and copies
into it on its own stream.

Nothing here touches CUDA at import time: this module is imported on CPU-only machines too.
"""

from __future__ import annotations

import logging

import torch

from protocol.messages import SlotsExported
from shm.cache_slots import ReadFence, SlotArray
from shm.layout import ExpertLayout, torch_dtype

log = logging.getLogger(__name__)


class EventFence(ReadFence):
    """A CUDA event recorded on the compute stream right after the kernels that read a slot were issued."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        self.event.synchronize()


class GpuSlots(SlotArray):
    """Slots in GPU memory: owned by the inference worker (``allocate``) or mapped by the loader (``attach``)."""

    def __init__(self, slots: torch.Tensor, layout: ExpertLayout, owner: bool) -> None:
        expected = (layout.n_slots, layout.row_numel)
        if tuple(slots.shape) != expected or slots.dtype != torch_dtype(layout.slot_row_dtype):
            raise ValueError(f"slots are {tuple(slots.shape)} {slots.dtype}, expected {expected} "
                             f"{layout.slot_row_dtype}")
        self.slots = slots  # [n_slots, 3*I*H] on the GPU
        self.layout = layout
        self.owner = owner

    # ------------------------------------------------------------ inference worker
    @classmethod
    def allocate(cls, layout: ExpertLayout, device: torch.device) -> GpuSlots:
        """Allocate every slot once, poisoned with NaN (integer dtypes: zero) so that a read of a slot nothing was
        copied into shows in the output instead of passing silently."""
        dtype = torch_dtype(layout.slot_row_dtype)
        slots = torch.empty(layout.n_slots, layout.row_numel, dtype=dtype, device=device)
        slots.fill_(float("nan") if dtype.is_floating_point else 0)
        # the loader's first copy must not race this fill: it is finished before the handle leaves this process
        torch.cuda.synchronize(device)
        log.info("allocated %d cache slots on %s (%.2f GB)", layout.n_slots, device,
                 slots.numel() * slots.element_size() / 1e9)
        return cls(slots, layout, owner=True)

    def read_fence(self) -> ReadFence:
        return EventFence(torch.cuda.current_stream(self.slots.device))

    def export(self) -> SlotsExported:
        """The message that lets the loader map these slots (call once; the tensor must outlive the runtime)."""
        if not self.owner:
            raise RuntimeError("slots mapped from another process cannot be exported again")
        if self.slots.storage_offset() != 0 or not self.slots.is_contiguous():
            raise RuntimeError("the slot tensor must own its storage from offset 0, contiguous")
        (device, handle, storage_nbytes, storage_offset_nbytes, ref_counter_handle, ref_counter_offset,
         event_handle, event_sync_required) = self.slots.untyped_storage()._share_cuda_()
        return SlotsExported(
            device=int(device), handle=bytes(handle), storage_nbytes=int(storage_nbytes),
            storage_offset_nbytes=int(storage_offset_nbytes), ref_counter_handle=bytes(ref_counter_handle),
            ref_counter_offset=int(ref_counter_offset), event_handle=bytes(event_handle),
            event_sync_required=bool(event_sync_required), n_slots=self.layout.n_slots,
            slot_numel=self.layout.row_numel, dtype=self.layout.slot_row_dtype)

    # ------------------------------------------------------------ loader
    @classmethod
    def attach(cls, msg: SlotsExported, layout: ExpertLayout) -> GpuSlots:
        """Map the inference worker's slots in this process (the loader)."""
        check_export(msg, layout)
        torch.cuda.init()  # as torch's own rebuild_cuda_tensor does before mapping: the C++ side expects it
        storage = torch.UntypedStorage._new_shared_cuda(
            msg.device, msg.handle, msg.storage_nbytes, msg.storage_offset_nbytes, msg.ref_counter_handle,
            msg.ref_counter_offset, msg.event_handle, msg.event_sync_required)
        slots = slots_over_storage(storage, msg)
        # _new_shared_cuda made this process's current stream wait on the producer's event (when one was
        # required); the loader copies on another stream, so settle that wait here, once, before any copy.
        torch.cuda.current_stream(slots.device).synchronize()
        log.info("mapped %d cache slots of the inference worker on cuda:%d", msg.n_slots, msg.device)
        return cls(slots, layout, owner=False)


def check_export(msg: SlotsExported, layout: ExpertLayout) -> None:
    """Refuse an export that does not match this runtime's layout (before mapping anything)."""
    if (msg.n_slots, msg.slot_numel, msg.dtype) != (layout.n_slots, layout.row_numel, layout.slot_row_dtype):
        raise ValueError(f"exported slots are {msg.n_slots} x {msg.slot_numel} {msg.dtype}, this runtime has "
                         f"{layout.n_slots} x {layout.row_numel} {layout.slot_row_dtype}")
    need = layout.n_slots * layout.slot_nbytes
    if msg.storage_nbytes < need:
        raise ValueError(f"exported storage holds {msg.storage_nbytes} bytes, the slots need {need}")


def slots_over_storage(storage: torch.UntypedStorage, msg: SlotsExported) -> torch.Tensor:
    """The ``[n_slots, slot_numel]`` tensor over a (mapped) untyped storage, sharing its memory."""
    dtype = torch_dtype(msg.dtype)
    return torch.empty(0, dtype=dtype, device=storage.device).set_(
        storage, 0, (msg.n_slots, msg.slot_numel), (msg.slot_numel, 1))
