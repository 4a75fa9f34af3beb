"""The expert-parallel MoE layer: routing, capacity policies, the all-to-all dispatch and the expert kernels."""
