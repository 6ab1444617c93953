"""Fast sampling: static KV cache, classifier-free guidance, seeded inverse-CDF draws,
speculative decoding (Jacobi self-drafting or a draft model; a relaxed, lossy acceptance)."""

from vqgen.sampling.draft import check_draft, draft_decode
from vqgen.sampling.draws import (
    SCHEDULES,
    draw_uniforms,
    guidance_scales,
    guide,
    inverse_cdf,
    probabilities,
    sample_logits,
    top_p_mask,
)
from vqgen.sampling.generate import decode_one, generate, sampling_options, text_bucket
from vqgen.sampling.relaxed import nearest_codes
from vqgen.sampling.speculative import PRIORS, speculative_decode, start_guess

__all__ = [
    "PRIORS",
    "SCHEDULES",
    "check_draft",
    "decode_one",
    "draft_decode",
    "draw_uniforms",
    "generate",
    "guidance_scales",
    "guide",
    "inverse_cdf",
    "nearest_codes",
    "probabilities",
    "sample_logits",
    "sampling_options",
    "speculative_decode",
    "start_guess",
    "text_bucket",
    "top_p_mask",
]
