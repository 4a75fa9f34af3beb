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
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in training (HF Mixtral's)
    family: str = "mixtral"  # the model family (moejax/models/<family>/), a Hugging Face model_type
    qk_norm: str = "none"  # QK_NORMS: "head" normalises q and k per head (weights [K]) before RoPE
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (Mixtral does)
    clip_qkv: float | None = None  # clamp q, k and v to [-clip_qkv, clip_qkv] after the norm (OLMoE option)
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
        if self.head_dim % 2:
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
        for f in ("bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            if not (isinstance(v, int) and 0 <= v < self.vocab_size):
                raise UserError(f"config {self.name}: {f}={v!r} must be a token id in [0, {self.vocab_size})")


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
    for f in ("rope_theta", "rms_norm_eps", "router_aux_loss_coef") + (("clip_qkv",) if d.get("clip_qkv") is not None else ()):
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
