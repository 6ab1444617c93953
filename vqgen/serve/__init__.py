"""Serving: the scheduler that batches image requests continuously into the decode engine's rows."""

from vqgen.serve.scheduler import Job, QueueFull, Request, Scheduler

__all__ = ["Job", "QueueFull", "Request", "Scheduler"]
