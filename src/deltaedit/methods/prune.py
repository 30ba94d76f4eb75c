"""PRUNE (Ma et al., 2024): MEMIT whose accumulated change is restrained after every edit.

The edited matrix's condition number grows with the number of edits; PRUNE maps the singular values of the
accumulated change W - W0 that exceed W0's largest singular value through a log function, keeping its
singular vectors (``MethodConfig.restrain``, applied by ``compose`` on every weight write, so undo and replay
recompute exactly the same restrained weights). PRUNE is MEMIT with ``restrain="prune"``; any other method
takes it with ``--set restrain=prune``.

When: PRUNE's public code edits the whole sequence unrestrained and restrains W_n - W0 once before it
evaluates. Here the restraint is part of every write, so each later edit is computed on the restrained model,
which is the model a user editing one fact at a time has in hand; the two agree while no singular value of
the change exceeds s_max. The log's base is ``restrain_base`` (e, the code's func_log; the paper tunes it).
"""

from __future__ import annotations

from dataclasses import dataclass

from .memit import MEMIT, MEMITConfig


@dataclass
class PRUNEConfig(MEMITConfig):
    """MEMIT's options with restrain="prune" and PRUNE's log function (restrain_function="log")."""

    restrain: str = "prune"


class PRUNE(MEMIT):
    name = "prune"
    config_class = PRUNEConfig
