"""Run a script with DeepSpeed on CPU: ``python tests/deepspeed_on_cpu.py SCRIPT ARGS...`` under
``accelerate launch --config_file configs/accelerate/deepspeed.yaml``.

Accelerate 1.x sets up DeepSpeed only where there is an accelerator: with ``cpu=True`` it
ignores the DeepSpeed config, and without it a CPU-only machine gets no process group. DeepSpeed
itself runs on CPU (its CPU accelerator, over gloo). For the tests, this lifts Accelerate's
guard: every process group is gloo, and ``cpu=True`` is dropped so the DeepSpeed path is taken.
Nothing in vqgen imports this file.
"""

import functools
import runpy
import sys

import accelerate
import accelerate.state
from accelerate.utils import DistributedType


def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_CPU


def _without_cpu_flag(init):
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        kwargs["cpu"] = False
        return init(self, *args, **kwargs)

    return wrapped


accelerate.state.PartialState._prepare_backend = _gloo_backend
accelerate.state.PartialState.__init__ = _without_cpu_flag(accelerate.state.PartialState.__init__)
accelerate.Accelerator.__init__ = _without_cpu_flag(accelerate.Accelerator.__init__)

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
