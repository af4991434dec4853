"""Pure jitted array kernels over batched (client-axis) pytrees."""
