"""SVDD (Li et al. 2024, arXiv 2408.08252): derivative-free reward-guided sampling for diffusers pipelines.

`svdd_sample(pipe, reward_fn, SVDDConfig(...), **pipe_kwargs)`; rewards in `fastdiff.guidance.rewards`;
SVDD-MC value networks in `fastdiff.guidance.value`.
"""

from fastdiff.guidance import rewards
from fastdiff.guidance.svdd import SVDDConfig, SVDDOutput, select_candidates, svdd_sample

__all__ = ["svdd_sample", "SVDDConfig", "SVDDOutput", "select_candidates", "rewards"]
