"""Pure jitted array kernels over batched (client-axis) pytrees.

Shipped as ``fedjax_sim.kernels``; nothing here imports from the rest of ``fedjax_sim``.
"""

from . import aggregation, distill, incentives, obp, split
from .aggregation import broadcast, gather, scatter, tree_bytes, tree_where, weighted_mean
from .distill import client_predictions, era, fccl_collaboration_loss, soft_targets
from .incentives import incfl_weights

__all__ = [
    "aggregation",
    "broadcast",
    "client_predictions",
    "distill",
    "era",
    "fccl_collaboration_loss",
    "gather",
    "incentives",
    "incfl_weights",
    "obp",
    "scatter",
    "soft_targets",
    "split",
    "tree_bytes",
    "tree_where",
    "weighted_mean",
]
