"""The run spec: everything static about a compiled program, each default resolved once.

Commands build it from their flags through `moejax.cli.flags.run_spec` (the one place that turns
flags into a run); the library takes it as an explicit argument. The platform is read here, once,
never inside traced code.
"""

from __future__ import annotations

import dataclasses

import jax

from moejax.config.model import KERNELS, POLICIES, ModelConfig
from moejax.errors import UserError
from moejax.models.family import Family
from moejax.models.registry import family_of
from moejax.ops import quant as q8
from moejax.ops.moe.dispatch import MoeSpec, resolve_kernel
from moejax.ops.moe.experts import Act
from moejax.ops.moe.ragged import GPU_ONLY_KERNELS
from moejax.parallel.mesh import AXES, MeshShape
from moejax.parallel.rules import Layout

# Expert capacity per source device = ceil(cf * tokens * k / experts). dropless's is only a round size
# (overflow runs further rounds); drop and reroute serve at most this many and drop or move the rest.
CAPACITY_FACTORS = {"dropless": 2.0, "drop": 1.25, "reroute": 1.25}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything static about a compiled program."""

    cfg: ModelConfig
    layout: Layout
    shape: MeshShape
    dtype: str = "float32"  # parameter and compute dtype; matmuls accumulate in float32
    policy: str = "dropless"
    capacity_factor: float | None = None  # None: CAPACITY_FACTORS[policy]
    microbatches: int = 1
    moe_kernel: str = "auto"  # config.KERNELS (moe.resolve_kernel, moe's docstring)
    training: bool = False  # differentiable MoE rounds; `auto` picks the batched kernel everywhere
    remat: bool = False  # recompute each layer's activations in the backward pass (jax.checkpoint)
    quant: str | None = None  # "int8": the params hold int8 matrices and their scales (quant.py)
    quant_matmul: str = "auto"  # auto, dequant, dynamic (quant.py)
    platform: str = ""  # "cpu", "gpu", ...: "" reads jax.default_backend() once, here
    mla_absorb: bool = True  # latent attention reads its cache in the absorbed form (ops/mla.py); False
    # expands the latent per head (the comparison `moejax bench mla` measures)

    def __post_init__(self):
        if not self.platform:
            object.__setattr__(self, "platform", jax.default_backend())
        if self.policy not in POLICIES:
            raise UserError(f"capacity policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.capacity_factor is None:
            object.__setattr__(self, "capacity_factor", CAPACITY_FACTORS[self.policy])
        if self.moe_kernel not in KERNELS:
            raise UserError(f"MoE kernel {self.moe_kernel!r}; valid: {', '.join(KERNELS)}")
        if self.moe_kernel in GPU_ONLY_KERNELS and self.platform != "gpu":
            raise UserError(f"MoE kernel {self.moe_kernel} runs on a GPU only (this is {self.platform}); "
                            f"ragged is the same exact-row kernel with jax.lax.ragged_dot")
        if self.moe_kernel == "ragged-tokamax":
            try:
                import tokamax  # noqa: F401
            except ImportError:
                raise UserError("MoE kernel ragged-tokamax needs tokamax: pip install tokamax (jax >= 0.11)") from None
        if not self.capacity_factor > 0:
            raise UserError(f"capacity factor {self.capacity_factor} must be > 0")
        if self.microbatches < 1:
            raise UserError(f"microbatches={self.microbatches} must be >= 1")
        q8.check_scheme(self.quant)
        q8.resolve_matmul(self.quant_matmul, "cpu")  # validates the name
        if self.quant and self.training:
            raise UserError("training takes float parameters: drop --quant (quantize the trained checkpoint "
                            "with `moejax ckpt quantize`)")
        family_of(self.cfg)  # a one-line error for a family moejax does not implement
        self.layout.validate(self.cfg, self.shape)

    @property
    def family(self) -> Family:
        return family_of(self.cfg)

    @property
    def batch_multiple(self) -> int:
        """Batch sizes must be a multiple of this (the caller pads)."""
        return self.layout.shards("batch", self.shape) * self.microbatches

    @property
    def quant_form(self) -> str:
        """The int8 matmul form this platform runs (ops/quant.py)."""
        return q8.resolve_matmul(self.quant_matmul, self.platform)

    def moe_spec(self) -> MoeSpec:
        ffn = self.layout.mesh_axes("expert_ffn")
        return MoeSpec(
            num_experts=self.cfg.num_experts, top_k=self.cfg.experts_per_token, policy=self.policy,
            capacity_factor=self.capacity_factor, expert_axes=self.layout.mesh_axes("experts"),
            expert_shards=self.layout.shards("experts", self.shape),
            ffn_axis=ffn[0] if ffn and self.shape.tp > 1 else None,
            ffn_shards=self.layout.shards("expert_ffn", self.shape),
            round_axes=tuple(a for a in AXES if a != "pp"), kernel=self.kernel, differentiable=self.training,
            router=self.cfg.router, renormalize=self.cfg.norm_topk_prob, n_group=self.cfg.n_group,
            topk_group=self.cfg.topk_group, routed_scale=float(self.cfg.routed_scaling_factor), platform=self.platform,
            router_logit_bias=self.cfg.router_logit_bias, expert_bias=self.cfg.expert_bias,
            act=Act(float(self.cfg.swiglu_alpha), self.cfg.swiglu_limit, float(self.cfg.swiglu_up_offset)))

    @property
    def kernel(self) -> str:
        if self.training and self.moe_kernel == "auto":
            return "batched"  # every expert is busy in training: per-expert branches save nothing
        return resolve_kernel(self.moe_kernel, self.platform)
