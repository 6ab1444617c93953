"""Training: one Accelerate loop, ``vqgen.train.loop.fit``, for the tokenizer, the transformer and
distillation into a student transformer.

Its pieces, each with a small interface: ``step`` (the forward/backward step), ``optim``
(parameter sets, the fused AdamW, the learning-rate schedule), ``ema``, ``metrics`` (what the
steps record on the device, and what the host reads and logs at sync points),
``checkpointing`` (save, resume, export), ``preview`` and ``backends`` (what differs between
Accelerate's backends). ``batches`` holds the data order; ``tokenizer``, ``transformer`` and
``distill`` hand the loop their ``Task``.
"""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint); the message names the step."""
