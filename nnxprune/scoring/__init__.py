"""Importance scores: which channels, heads, neurons, layers or weights matter least.

`base` holds the protocol, the member reduction and the registry; each module registers its
scores on import (`weight_norm`; `wanda`, `activation`; `block_influence`; `taylor` and its
variants, `l2`, `random`). `get_score(name)` finds one.
"""

from nnxprune.scoring import activation, block_influence, taylor, weight  # noqa: F401  (registers the scores)
from nnxprune.scoring import wanda_sp  # noqa: F401,E402  (registers wanda_sp)
from nnxprune.scoring import flap  # noqa: F401,E402  (registers flap_wifv, flap_ifv, flap_wifn)
from nnxprune.scoring.base import SCORES, Score, Stats, get_score, lowest, reduce_members, register_score

__all__ = ["SCORES", "Score", "Stats", "get_score", "lowest", "reduce_members", "register_score"]
