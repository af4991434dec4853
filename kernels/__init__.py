"""Pure jitted array kernels over batched (client-axis) pytrees.

Shipped as ``fedjax_sim.kernels``; nothing here imports from the rest of ``fedjax_sim``.
"""

from . import aggregation, obp, split
from .aggregation import broadcast, gather, scatter, tree_bytes, tree_where, weighted_mean

__all__ = [
    "aggregation",
    "broadcast",
    "gather",
    "obp",
    "scatter",
    "split",
    "tree_bytes",
    "tree_where",
    "weighted_mean",
]
