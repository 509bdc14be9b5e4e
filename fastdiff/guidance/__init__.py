"""SVDD (Li et al. 2024, arXiv 2408.08252): derivative-free reward-guided sampling for diffusers pipelines.

`svdd_sample(pipe, reward_fn, SVDDConfig(...), **pipe_kwargs)`; rewards in `fastdiff.guidance.rewards`;
SVDD-MC value networks in `fastdiff.guidance.value`.
"""

from fastdiff.guidance import rewards
from fastdiff.guidance.svdd import SVDDConfig, SVDDOutput, select_candidates, svdd_sample
from fastdiff.guidance.value import ValueNetwork, load_value_function, save_value_function, train_value_function

__all__ = ["svdd_sample", "SVDDConfig", "SVDDOutput", "select_candidates", "rewards", "train_value_function",
           "save_value_function", "load_value_function", "ValueNetwork"]
