"""RECT (Gu et al., 2024): MEMIT whose every update keeps only its top 20% entries by relative change.

Editing harms general abilities through large relative changes of a few weights; RECT keeps the entries of an
update with the largest |dW| / |W| and zeroes the rest (``MethodConfig.sparsify``, applied by
``finalize_update`` before the update is written, so it is stored sparse). RECT is MEMIT with sparsify=0.2;
any other method takes it with ``--set sparsify=0.2``.

Where: RECT's public code sparsifies ROME's one update once it is computed. In MEMIT's layer loop the hook runs
on each layer's update before it is written, so the layers above measure (and make up) what the lower layers'
sparsified updates left missing at the critical layer; sparsifying every layer's update only after all were
computed would leave that part unwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memit import MEMIT, MEMITConfig


@dataclass
class RECTConfig(MEMITConfig):
    """MEMIT's options with sparsify=0.2: the top-20% relative changes RECT keeps (its paper's setting)."""

    sparsify: float = 0.2


class RECT(MEMIT):
    name = "rect"
    config_class = RECTConfig
