"""Typed identifiers shared by every process.

An ``ExpertId`` is flat over the whole model: ``moe_layer * experts_per_layer + expert``, where ``moe_layer``
counts only the decoder layers that have experts.
"""

from typing import NewType

ExpertId = NewType("ExpertId", int)
SlotId = NewType("SlotId", int)
RequestId = NewType("RequestId", int)
LoadId = NewType("LoadId", int)
