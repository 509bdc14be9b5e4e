"""DPM-Solver++ schedulers (Lu et al. 2022, arXiv 2211.01095) for diffusers pipelines, and schedule utilities.

>>> from fastdiff.schedulers import DPMSolverPlusPlusScheduler
>>> pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)
"""

from fastdiff.schedulers.schedules import load_schedule, save_schedule
from fastdiff.schedulers.scheduling_dpmsolver_plus_plus import DPMSolverPlusPlusScheduler
from fastdiff.schedulers.scheduling_dpmsolver_plus_plus_singlestep import DPMSolverPlusPlusSinglestepScheduler

__all__ = ["DPMSolverPlusPlusScheduler", "DPMSolverPlusPlusSinglestepScheduler", "load_schedule", "save_schedule"]
