"""VQ image tokenizer: encoders/decoder, quantizer wiring, training losses."""

from vqgen.tokenizer.losses import LPIPS, PatchDiscriminator, TokenizerTrainer, load_lpips, psnr
from vqgen.tokenizer.model import VQTokenizer, digit_vectors

__all__ = ["LPIPS", "PatchDiscriminator", "TokenizerTrainer", "VQTokenizer", "digit_vectors", "load_lpips", "psnr"]
