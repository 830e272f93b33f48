"""Training one run: learner, callbacks, checkpoints, prepare / fit / resume / store,
multi-process runs."""

from .callbacks import EarlyStop, EpochLine, KeepBest
from .learner import imbalance_plan, learner, metric_names, schedule
from .run import (Predictions, Prepared, RunResult, check_new_name, fit_posthoc_steps, fit_run, prepare, resume_run,
                  run_metrics, store_run, train, with_posthoc)

__all__ = ["EarlyStop", "EpochLine", "KeepBest", "Predictions", "Prepared", "RunResult", "check_new_name",
           "fit_posthoc_steps", "fit_run",
           "imbalance_plan", "learner", "metric_names", "prepare", "resume_run", "run_metrics", "schedule", "store_run",
           "train", "with_posthoc"]
