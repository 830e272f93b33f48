"""Training one run: learner, callbacks, checkpoints, prepare / fit / resume / store, hardware switches,
multi-process runs."""

from .run import (EarlyStop, EpochLine, KeepBest, Predictions, RunResult, fit_posthoc_steps, fit_run, imbalance_plan,
                  learner, resume_run, run_metrics, schedule, store_run, train, with_posthoc)

__all__ = ["EarlyStop", "EpochLine", "KeepBest", "Predictions", "RunResult", "fit_posthoc_steps", "fit_run",
           "imbalance_plan", "learner", "resume_run", "run_metrics", "schedule", "store_run", "train", "with_posthoc"]
