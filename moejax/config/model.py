"""Model configuration: a frozen, validated dataclass loaded from `configs/*.yaml`.

Shape letters used across moejax (also in tensor names such as `x_BTD`, `w1_LEDF`):
  B batch, T tokens, S cache length, N tokens on a device, D model, H heads, G kv heads,
  K head dim, F expert ffn, E experts, C capacity, L layers, V vocab, M microbatches.
"""

from __future__ import annotations

import dataclasses
import os

import yaml

from moejax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
POLICIES = ("dropless", "drop", "reroute")  # MoE capacity policies (moe.py)
KERNELS = ("auto", "buffers", "batched", "ragged", "ragged-mgpu", "ragged-tokamax")  # MoE kernels (moe.py's docstring)
QUANT_SCHEMES = ("int8",)  # weight quantization (quant.py)
QUANT_MATMULS = ("auto", "dequant", "dynamic")  # how a quantized matrix is multiplied (quant.py)
QK_NORMS = ("none", "head", "proj")  # RMSNorm of q and k before RoPE: none, each head's dims (Qwen3),
# or the whole projection, every head together (OLMoE: a sum over tp)
ROUTERS = ("softmax_topk", "sigmoid_topk")  # ops/moe/router.py: softmax over all experts then top-k
# (Mixtral, Qwen, OLMoE); sigmoid scores, a selection-only correction bias, group-limited (GLM, DeepSeek-V3)
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's layer_types: a layer's attention span
ROPE_TYPES = ("default", "linear", "yarn")  # RoPE scaling as transformers computes it (ops/layers.py)
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                      "mscale_all_dim", "attention_factor", "truncate")}
REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, meshes/, gpus/
_CONFIG_DIR = os.path.join(REPO_DIR, "configs")


def preset_candidates(path: str, folder: str) -> list[str]:
    """Where a preset named `path` may be: as given (from the working directory), then the shipped
    `folder/` under the repository (`seed`, `seed.yaml` or `configs/seed.yaml` from any directory)."""
    return [path, os.path.join(REPO_DIR, path), os.path.join(folder, path), os.path.join(folder, path + ".yaml")]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A MoE decoder of one model family. Field names follow the shape letters above. What the
    fields mean for the weights (which tensors exist, their shapes) is the family's table
    (moejax/models/<family>/); counts and FLOPs are in moejax/models/counts.py."""

    name: str
    num_layers: int  # L
    num_experts: int  # E
    experts_per_token: int  # top-k
    d_model: int  # D
    num_heads: int  # H
    head_dim: int  # K
    num_kv_heads: int  # G
    expert_ffn: int  # F
    vocab_size: int  # V
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    param_dtype: str = "float16"
    max_seq_len: int = 10240
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None  # its embedding row gets no gradient (torch's Embedding padding_idx)
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in training (HF Mixtral's)
    family: str = "mixtral"  # the model family (moejax/models/<family>/), a Hugging Face model_type
    qk_norm: str = "none"  # QK_NORMS: "head" normalises q and k per head (weights [K]) before RoPE
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (Mixtral does)
    clip_qkv: float | None = None  # clamp q, k and v to [-clip_qkv, clip_qkv] after the norm (OLMoE option)
    attention_bias: bool = False  # q, k and v projections have biases (Qwen2-MoE, GLM-4.5)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first int(K x this) dims of each head (GLM: 0.5)
    rope_scaling: tuple = ()  # (key, value) pairs of HF's rope_parameters besides theta: rope_type
    # (ROPE_TYPES) and its fields (ROPE_KEYS); () is default RoPE. YAML: a mapping.
    tie_word_embeddings: bool = False  # the head is the embedding's transpose (no lm_head tensor)
    router: str = "softmax_topk"  # ROUTERS
    n_group: int = 1  # sigmoid_topk: experts in n_group groups, tokens choose within topk_group of them
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # routed experts' weights are multiplied by this (after renormalising)
    shared_expert_ffn: int = 0  # a dense SwiGLU every MoE layer runs on every token beside its experts (0: none)
    shared_expert_gate: bool = False  # the shared expert's output is scaled by sigmoid(x . w) (Qwen2-MoE)
    dense_layers: tuple = ()  # indices of layers whose FFN is a dense SwiGLU instead of the MoE
    dense_ffn: int = 0  # those layers' hidden size
    attention_out_bias: bool = False  # the output projection has a bias too (GPT-OSS)
    attention_sinks: bool = False  # a learnt logit per head joins each softmax's denominator, with no value (GPT-OSS)
    sliding_window: int | None = None  # a "sliding_attention" layer's query at i sees keys i - W < j <= i
    layer_types: tuple = ()  # LAYER_TYPES, one per layer; () = every layer full_attention
    router_logit_bias: bool = False  # the router's logits have a learnt bias [E] (GPT-OSS)
    expert_bias: bool = False  # the experts' gate, up and down projections have biases (GPT-OSS)
    swiglu_alpha: float = 1.0  # experts' activation: g * sigmoid(alpha g) * (u + swiglu_up_offset), after
    swiglu_limit: float | None = None  # clamping g to <= limit and u to [-limit, limit] (GPT-OSS: 1.702, 7, 1)
    swiglu_up_offset: float = 0.0
    kv_lora_rank: int = 0  # > 0: multi-head latent attention (DeepSeek-V3): keys and values expand per head from
    # a cached latent of this many values, plus one RoPE key of qk_rope_head_dim dims shared by the heads
    q_lora_rank: int = 0  # MLA's low-rank query (q_a -> norm -> q_b) of this rank; 0: one q projection
    qk_rope_head_dim: int = 0  # MLA: the RoPE dims at the end of each q and k head (head_dim = nope + these)
    v_head_dim: int = 0  # MLA: each head's value dims
    rope_interleave: bool = False  # RoPE rotates adjacent pairs (x0, x1), (x2, x3)... (DeepSeek-V3), not halves
    description: str = ""

    def __post_init__(self):
        for f in ("num_layers", "num_experts", "experts_per_token", "d_model", "num_heads",
                  "head_dim", "num_kv_heads", "expert_ffn", "vocab_size", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"config {self.name}: {f}={v!r} must be a positive integer")
        if self.experts_per_token > self.num_experts:
            raise UserError(f"config {self.name}: experts_per_token={self.experts_per_token} must be "
                            f"<= num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"config {self.name}: num_heads={self.num_heads} must be a multiple of "
                            f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2 and not self.kv_lora_rank:  # latent attention rotates qk_rope_head_dim only
            raise UserError(f"config {self.name}: head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.param_dtype not in DTYPES:
            raise UserError(f"config {self.name}: param_dtype={self.param_dtype!r}; valid: {', '.join(DTYPES)}")
        if not (float(self.rope_theta) > 0 and float(self.rms_norm_eps) > 0):
            raise UserError(f"config {self.name}: rope_theta and rms_norm_eps must be positive")
        if not float(self.router_aux_loss_coef) >= 0:
            raise UserError(f"config {self.name}: router_aux_loss_coef={self.router_aux_loss_coef!r} must be >= 0")
        if not (isinstance(self.family, str) and self.family):
            raise UserError(f"config {self.name}: family={self.family!r} must be a model family name (e.g. mixtral)")
        if self.qk_norm not in QK_NORMS:
            raise UserError(f"config {self.name}: qk_norm={self.qk_norm!r}; valid: {', '.join(QK_NORMS)}")
        if self.clip_qkv is not None and not (isinstance(self.clip_qkv, (int, float)) and self.clip_qkv > 0):
            raise UserError(f"config {self.name}: clip_qkv={self.clip_qkv!r} must be a positive number or null")
        if not isinstance(self.norm_topk_prob, bool):
            raise UserError(f"config {self.name}: norm_topk_prob={self.norm_topk_prob!r} must be true or false")
        self._validate_families()
        self._validate_attention_and_experts()
        self._validate_latent_attention()
        for f in ("bos_token_id", "eos_token_id") + (("pad_token_id",) if self.pad_token_id is not None else ()):
            v = getattr(self, f)
            if not (isinstance(v, int) and 0 <= v < self.vocab_size):
                raise UserError(f"config {self.name}: {f}={v!r} must be a token id in [0, {self.vocab_size})")


    def _validate_families(self):
        """The fields families beyond Mixtral add (each one-line)."""
        for f in ("attention_bias", "tie_word_embeddings", "shared_expert_gate"):
            if not isinstance(getattr(self, f), bool):
                raise UserError(f"config {self.name}: {f}={getattr(self, f)!r} must be true or false")
        prf = self.partial_rotary_factor
        if not (isinstance(prf, (int, float)) and 0 < prf <= 1 and (int(self.head_dim * prf) % 2 == 0 or self.kv_lora_rank)):
            raise UserError(f"config {self.name}: partial_rotary_factor={prf!r} must be in (0, 1] and give an even "
                            f"number of rotated dims (head_dim={self.head_dim})")
        rope = self.rope
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            raise UserError(f"config {self.name}: rope_scaling rope_type={rope.get('rope_type')!r} is not "
                            f"supported; valid: {', '.join(ROPE_TYPES)}")
        kind = rope.get("rope_type", "default")
        extra = sorted(set(rope) - {"rope_type"} - set(ROPE_KEYS[kind]))
        if extra:
            raise UserError(f"config {self.name}: rope_scaling key {extra[0]!r} is not read by rope_type {kind} "
                            f"(valid: {', '.join(ROPE_KEYS[kind]) or 'none'})")
        if kind != "default" and not (isinstance(rope.get("factor"), (int, float)) and rope["factor"] >= 1):
            raise UserError(f"config {self.name}: rope_scaling factor={rope.get('factor')!r} must be a number >= 1")
        if kind == "yarn" and not isinstance(rope.get("original_max_position_embeddings"), int):
            raise UserError(f"config {self.name}: yarn RoPE needs an integer original_max_position_embeddings")
        if self.router not in ROUTERS:
            raise UserError(f"config {self.name}: router={self.router!r}; valid: {', '.join(ROUTERS)}")
        for f in ("n_group", "topk_group"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"config {self.name}: {f}={v!r} must be a positive integer")
        per_group = self.num_experts // self.n_group
        if self.num_experts % self.n_group or self.topk_group > self.n_group or (self.n_group > 1 and per_group < 2):
            raise UserError(f"config {self.name}: n_group={self.n_group}, topk_group={self.topk_group} must divide "
                            f"num_experts={self.num_experts} into groups of >= 2 with topk_group <= n_group")
        if self.experts_per_token > self.topk_group * per_group:
            raise UserError(f"config {self.name}: experts_per_token={self.experts_per_token} exceeds the "
                            f"{self.topk_group * per_group} experts of the topk_group={self.topk_group} groups a "
                            f"token may use")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            raise UserError(f"config {self.name}: routed_scaling_factor={self.routed_scaling_factor!r} must be > 0")
        for f in ("shared_expert_ffn", "dense_ffn"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UserError(f"config {self.name}: {f}={v!r} must be an integer >= 0")
        if self.shared_expert_gate and not self.shared_expert_ffn:
            raise UserError(f"config {self.name}: shared_expert_gate needs shared_expert_ffn > 0")
        dense = self.dense_layers
        if (not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in dense)
                or list(dense) != sorted(set(dense))):
            raise UserError(f"config {self.name}: dense_layers={list(dense)!r} must be increasing layer indices "
                            f"in [0, {self.num_layers})")
        if len(dense) == self.num_layers:
            raise UserError(f"config {self.name}: every layer is in dense_layers: a MoE model needs a MoE layer")
        if bool(dense) != bool(self.dense_ffn):
            raise UserError(f"config {self.name}: dense_layers={list(dense)!r} and dense_ffn={self.dense_ffn} must "
                            f"be given together")

    def _validate_attention_and_experts(self):
        """Sliding windows, sinks and the biased, clamped experts (GPT-OSS)."""
        for f in ("attention_out_bias", "attention_sinks", "router_logit_bias", "expert_bias"):
            if not isinstance(getattr(self, f), bool):
                raise UserError(f"config {self.name}: {f}={getattr(self, f)!r} must be true or false")
        types = self.layer_types
        if types and (len(types) != self.num_layers or not all(t in LAYER_TYPES for t in types)):
            raise UserError(f"config {self.name}: layer_types={list(types)!r} must give one of "
                            f"{', '.join(LAYER_TYPES)} for each of the {self.num_layers} layers")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise UserError(f"config {self.name}: sliding_window={w!r} must be a positive integer or null")
        if "sliding_attention" in types and w is None:
            raise UserError(f"config {self.name}: layer_types has sliding_attention layers but sliding_window is null")
        if not (isinstance(self.swiglu_alpha, (int, float)) and self.swiglu_alpha > 0):
            raise UserError(f"config {self.name}: swiglu_alpha={self.swiglu_alpha!r} must be > 0")
        limit = self.swiglu_limit
        if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
            raise UserError(f"config {self.name}: swiglu_limit={self.swiglu_limit!r} must be a positive number or null")
        if not isinstance(self.swiglu_up_offset, (int, float)):
            raise UserError(f"config {self.name}: swiglu_up_offset={self.swiglu_up_offset!r} must be a number")

    def _validate_latent_attention(self):
        """Multi-head latent attention's fields (DeepSeek-V3), and what moejax does not combine with it."""
        for f in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UserError(f"config {self.name}: {f}={v!r} must be an integer >= 0")
        if not isinstance(self.rope_interleave, bool):
            raise UserError(f"config {self.name}: rope_interleave={self.rope_interleave!r} must be true or false")
        if not self.kv_lora_rank:
            for f in ("q_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, f):
                    raise UserError(f"config {self.name}: {f}={getattr(self, f)} needs kv_lora_rank > 0 (latent "
                                    f"attention)")
            return
        r = self.qk_rope_head_dim
        if not (0 < r < self.head_dim and r % 2 == 0) or self.v_head_dim <= 0:
            raise UserError(f"config {self.name}: latent attention needs an even qk_rope_head_dim in (0, head_dim="
                            f"{self.head_dim}) (got {r}) and v_head_dim > 0 (got {self.v_head_dim})")
        if self.num_kv_heads != self.num_heads:
            raise UserError(f"config {self.name}: latent attention expands one key and value per query head: "
                            f"num_kv_heads={self.num_kv_heads} must equal num_heads={self.num_heads}")
        other = [f for f in ("attention_bias", "attention_out_bias", "attention_sinks") if getattr(self, f)]
        other += ["qk_norm"] if self.qk_norm != "none" else []
        other += ["layer_types"] if "sliding_attention" in self.layer_types else []
        other += ["partial_rotary_factor"] if self.partial_rotary_factor != 1.0 else []
        if other:
            raise UserError(f"config {self.name}: {other[0]} is not implemented with latent attention "
                            f"(kv_lora_rank > 0)")

    @property
    def latent_attention(self) -> bool:
        return self.kv_lora_rank > 0

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier position)."""
        return self.sliding_window if self.layer_types and self.layer_types[layer] == "sliding_attention" else None

    @property
    def rope(self) -> dict:
        """rope_scaling as a dict ({} for default RoPE)."""
        return dict(self.rope_scaling)

    @property
    def rotary_dim(self) -> int:
        if self.latent_attention:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layers(self) -> tuple:
        """Indices of the MoE layers (every layer not in dense_layers)."""
        return tuple(i for i in range(self.num_layers) if i not in set(self.dense_layers))

    def slot_rows(self, kind: str, pp: int) -> list[tuple[int, ...]]:
        """For each local layer slot l of a pipeline stage: the row of a `kind` stack that stage s holds
        there (its layer s * L/pp + l), or -1 where that layer is of another kind."""
        lp = self.num_layers // pp
        at = {layer: j for j, layer in enumerate(self.kind_layers(kind))}
        return [tuple(at.get(s * lp + l, -1) for s in range(pp)) for l in range(lp)]

    def kind_layers(self, kind: str) -> tuple:
        """Layer indices of a parameter kind (models/family.py Param.kind): every layer, MoE, or dense."""
        return {"layer": tuple(range(self.num_layers)), "moe": self.moe_layers, "dense": tuple(self.dense_layers)}[kind]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a compute dtype, or of a quantized matrix's int8 values."""
    if dtype == "int8":
        return 1
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return 4 if dtype == "float32" else 2


def _fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def config_from_dict(d: dict, name: str) -> ModelConfig:
    unknown = sorted(set(d) - set(_fields()) - {"name"})
    if unknown:
        raise UserError(f"config {name}: unknown key {unknown[0]!r}; valid keys: {', '.join(_fields()[1:])}")
    missing = [f.name for f in dataclasses.fields(ModelConfig)
               if f.default is dataclasses.MISSING and f.name != "name" and f.name not in d]
    if missing:
        raise UserError(f"config {name}: missing key {missing[0]!r}")
    d = dict(d)
    d["name"] = str(d.get("name", name))
    rope = d.get("rope_scaling") or {}
    if isinstance(rope, (list, tuple)):  # a checkpoint's meta stores the pairs as lists
        rope = dict(tuple(p) for p in rope)
    if not isinstance(rope, dict):
        raise UserError(f"config {name}: rope_scaling={rope!r} must be a mapping (rope_type and its fields)")
    d["rope_scaling"] = tuple(sorted(rope.items()))
    if "dense_layers" in d:
        if not isinstance(d["dense_layers"], (list, tuple)):
            raise UserError(f"config {name}: dense_layers={d['dense_layers']!r} must be a list of layer indices")
        d["dense_layers"] = tuple(d["dense_layers"])
    if "layer_types" in d:
        if not isinstance(d["layer_types"], (list, tuple)):
            raise UserError(f"config {name}: layer_types={d['layer_types']!r} must be a list (one entry per layer)")
        d["layer_types"] = tuple(d["layer_types"])
    numbers = ("rope_theta", "rms_norm_eps", "router_aux_loss_coef", "partial_rotary_factor", "routed_scaling_factor",
               "swiglu_alpha", "swiglu_up_offset")
    for f in numbers + tuple(f for f in ("clip_qkv", "swiglu_limit") if d.get(f) is not None):
        if f in d:
            try:
                d[f] = float(d[f])
            except (TypeError, ValueError):
                raise UserError(f"config {name}: {f}={d[f]!r} must be a number") from None
    return ModelConfig(**d)


def resolve_config_path(path: str) -> str:
    """`configs/seed.yaml`, a file path, or a bare name like `seed` (looked up in configs/)."""
    for c in preset_candidates(path, _CONFIG_DIR):
        if os.path.isfile(c):
            return c
    shipped = sorted(f[:-5] for f in os.listdir(_CONFIG_DIR) if f.endswith(".yaml")) \
        if os.path.isdir(_CONFIG_DIR) else []
    raise UserError(f"unknown config {path!r}: no such file; shipped configs: {', '.join(shipped)}")


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a mapping of keys to values")
    return d


TRAIN_SECTION = "train"  # a config file's optional training defaults (scripts/train.py's flags)


def load_config(path: str) -> ModelConfig:
    p = resolve_config_path(path)
    d = load_yaml(p)
    d.pop(TRAIN_SECTION, None)
    return config_from_dict(d, os.path.splitext(os.path.basename(p))[0])


def load_train_defaults(path: str) -> dict:
    """The config file's `train:` mapping (flag name with underscores -> value), or {}."""
    p = resolve_config_path(path)
    d = load_yaml(p).get(TRAIN_SECTION) or {}
    if not isinstance(d, dict):
        raise UserError(f"{p}: {TRAIN_SECTION}: expected a mapping of training flags to values")
    return d
