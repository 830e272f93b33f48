"""Ensembles of stored runs: loading and aligning members, combiners, greedy search, cross-validation and
bootstrap."""

from .core import (BETA_GRID, Combiner, EnsembleResult, METHODS, aligned_probs, check_runs, choose_beta, combine,
                   cross_val_combine, ensemble, fit_combiner, kfold_indices, paired_bootstrap)

__all__ = ["BETA_GRID", "Combiner", "EnsembleResult", "METHODS", "aligned_probs", "check_runs", "choose_beta",
           "combine", "cross_val_combine", "ensemble", "fit_combiner", "kfold_indices", "paired_bootstrap"]
