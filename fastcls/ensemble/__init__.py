"""Ensembles of stored runs: `members` (load, align, check), `search` (greedy weight search), `combiners` (the
`METHODS` registry), `stats` (TTA beta, cross-validation, bootstrap) and `run` (the `ensemble` entry point)."""

from .combiners import METHODS, Combiner, combine, fit_combiner
from .members import aligned_probs, check_runs
from .run import EnsembleResult, ensemble
from .stats import BETA_GRID, choose_beta, cross_val_combine, kfold_indices, paired_bootstrap

__all__ = ["BETA_GRID", "Combiner", "EnsembleResult", "METHODS", "aligned_probs", "check_runs", "choose_beta",
           "combine", "cross_val_combine", "ensemble", "fit_combiner", "kfold_indices", "paired_bootstrap"]
