"""Tokenizer training from WebDataset shards that records what each process reads, run as a
script under ``accelerate launch``: ``python tests/read_shards_task.py OUT [key=value ...]``
(config overrides). Process ``r`` writes ``OUT/read_rank{r}.json``: the captions of each
micro-step's batch, in order, as the training loop received them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vqgen.config import load_config
from vqgen.train.batches import ShardBatches
from vqgen.train.tokenizer import train_tokenizer

if __name__ == "__main__":
    out, *overrides = sys.argv[1:]
    record: dict = {"steps": []}
    original = ShardBatches.__call__

    def recording(self: ShardBatches, i: int, rank: int, world: int) -> dict:
        batch = original(self, i, rank, world)
        record["steps"].append(batch["caption"])
        record.update(rank=rank, world=world)
        return batch

    ShardBatches.__call__ = recording
    train_tokenizer(load_config(None, overrides), Path(out), eval_num=0)
    (Path(out) / f"read_rank{record['rank']}.json").write_text(json.dumps(record))
