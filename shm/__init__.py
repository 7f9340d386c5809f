"""Shared memory of the runtime: the host expert store, the cache slots (CPU path) and the slot table.

Every segment is named ``promoe_<run>_<what>``, created and unlinked by the supervisor (its owner); workers only
attach. ``SEGMENT_PREFIX`` lets tests and operators find leaks in ``/dev/shm``.
"""

SEGMENT_PREFIX = "promoe_"
