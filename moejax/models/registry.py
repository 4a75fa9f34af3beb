"""Model families by Hugging Face `model_type` (`ModelConfig.family`)."""

from __future__ import annotations

from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.models.family import Family
from moejax.models.deepseek_v3 import FAMILY as DEEPSEEK_V3
from moejax.models.glm4_moe import FAMILY as GLM4_MOE
from moejax.models.gpt_oss import FAMILY as GPT_OSS
from moejax.models.mixtral import FAMILY as MIXTRAL
from moejax.models.olmoe import FAMILY as OLMOE
from moejax.models.qwen2_moe import FAMILY as QWEN2_MOE
from moejax.models.qwen3_moe import FAMILY as QWEN3_MOE

FAMILIES: dict[str, Family] = {f.model_type: f for f in (MIXTRAL, QWEN3_MOE, OLMOE, QWEN2_MOE, GLM4_MOE, GPT_OSS,
                                                           DEEPSEEK_V3)}


def get(model_type: str, where: str = "config") -> Family:
    """The family of a `model_type`, or a one-line error naming the ones moejax implements."""
    try:
        return FAMILIES[model_type]
    except (KeyError, TypeError):
        raise UserError(f"{where}: model family {str(model_type)[:80]!r} is not implemented; "
                        f"valid: {', '.join(sorted(FAMILIES))}") from None


def family_of(cfg: ModelConfig) -> Family:
    family = get(cfg.family, f"config {cfg.name}")
    for field, value in family.fixed:
        if getattr(cfg, field) != value:
            raise UserError(f"config {cfg.name}: {field}={getattr(cfg, field)!r} does not fit family {family.model_type} "
                            f"(its weights need {field}={value!r})")
    if cfg.latent_attention != family.latent_attention:
        need = "needs kv_lora_rank > 0" if family.latent_attention else "has no latent attention: kv_lora_rank must be 0"
        raise UserError(f"config {cfg.name}: kv_lora_rank={cfg.kv_lora_rank} does not fit family {family.model_type} "
                        f"(it {need})")
    return family
