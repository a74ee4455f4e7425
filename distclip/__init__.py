"""distclip: exact global gradient-norm clipping for models split across processes.

One all-reduce per call, every gradient element counted exactly once, whatever the mix of
DDP, FSDP1/FSDP2, HSDP, tensor, pipeline and expert parallelism.
"""

from distclip.clip_grad import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from distclip.clipper import GradClipper
from distclip.decision import ClipResult
from distclip.explain import Explanation, GradientExplanation, explain
from distclip.metrics import Max, Mean, Min, Sum
from distclip.policies import AutoClip, SpikeSkip, ZClip

__all__ = [
    "AutoClip",
    "ClipResult",
    "Explanation",
    "GradClipper",
    "GradientExplanation",
    "Max",
    "Mean",
    "Min",
    "SpikeSkip",
    "Sum",
    "ZClip",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "explain",
    "get_total_norm",
]
__version__ = "0.1.0"
