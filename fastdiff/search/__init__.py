"""AutoDiffusion (Li et al. 2023, arXiv 2309.10438): evolutionary search of the step schedule.

    >>> from fastdiff.search import search_timesteps, SearchConfig
    >>> result = search_timesteps(pipe, num_steps=4, objective="fd", config=SearchConfig(seed=0))
    >>> pipe(class_labels=[3], timesteps=result.timesteps)
"""

from __future__ import annotations

from fastdiff.search.autodiffusion import SearchConfig, SearchResult, search_timesteps

__all__ = ["search_timesteps", "SearchConfig", "SearchResult"]
