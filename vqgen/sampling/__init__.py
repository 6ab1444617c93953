"""Fast sampling: static KV cache, classifier-free guidance, seeded inverse-CDF draws."""

from vqgen.sampling.generate import (
    SCHEDULES,
    KVCache,
    decode_one,
    draw_uniforms,
    generate,
    guidance_scales,
    inverse_cdf,
    make_caches,
    next_code,
    sample_logits,
    sampling_options,
    top_p_mask,
)

__all__ = [
    "SCHEDULES",
    "KVCache",
    "decode_one",
    "draw_uniforms",
    "generate",
    "guidance_scales",
    "inverse_cdf",
    "make_caches",
    "next_code",
    "sample_logits",
    "sampling_options",
    "top_p_mask",
]
