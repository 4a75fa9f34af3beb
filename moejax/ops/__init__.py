"""Per-device math that knows no model family: norms, RoPE, attention, int8 matmuls, MoE routing and dispatch."""
