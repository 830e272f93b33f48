"""fastcls: fastai-based rapid experimentation for image-classification competitions.

The same functions serve the `fastcls` CLI and notebooks::

    from fastcls import get_recipe, RunConfig, fit_run, RunStore, plot_batch, write_report
    plot_batch(get_recipe("digits"))                 # a matplotlib Figure: what the network sees
    run = fit_run(RunConfig(get_recipe("digits"), "resnet18"), RunStore("runs"))
    RunStore("runs").leaderboard()                   # a pandas DataFrame
    write_report(RunStore("runs"), run.run_id)       # confusion matrix, per-class F1, top losses, HTML

Names are imported on first use, so `fastcls --help` does not pay for importing torch and fastai.
"""

import importlib
import warnings
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# torch 2.14 warns on every import of modules that still call torch.jit.script (timm, torchvision): not actionable here
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)

_EXPORTS = {
    "errors": ["FastclsError", "RunInterrupted"],
    "recipe": ["Recipe", "find_recipes", "get_recipe"],
    "archs": ["ARCHS", "ArchSpec", "build_model", "get_arch", "register_arch"],
    "data": ["Items", "dls", "read_items", "check_images", "scan_images"],
    "runs": ["RunData", "RunStore", "StoredRun"],
    "config": ["RunConfig"],
    "train": ["RunResult", "fit_run", "resume_run", "learner"],
    "predict": ["predict_views", "tta_blend"],
    "experiments.sweep": ["plan_sweep", "run_sweep", "list_sweeps", "load_sweep", "sweep_table"],
    "experiments.features": ["cached_features", "fit_head_run"],
    "experiments.executors": ["LocalExecutor", "RayExecutor"],
    "report": ["confusion", "lr_find", "per_class", "plot_batch", "plot_confusion", "plot_history", "plot_lr_find",
               "plot_per_class", "plot_sweep", "plot_top_losses", "save_figure", "top_losses",
               "write_report"],
}
__all__ = [name for names in _EXPORTS.values() for name in names]
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # explicit imports for editors and type checkers ("go to definition")
    from .archs import ARCHS, ArchSpec, build_model, get_arch, register_arch
    from .data import Items, check_images, dls, read_items, scan_images
    from .errors import FastclsError, RunInterrupted
    from .predict import predict_views, tta_blend
    from .recipe import Recipe, find_recipes, get_recipe
    from .experiments.executors import LocalExecutor, RayExecutor
    from .experiments.features import cached_features, fit_head_run
    from .report import (confusion, lr_find, per_class, plot_batch, plot_confusion, plot_history, plot_lr_find,
                         plot_per_class, plot_sweep, plot_top_losses, save_figure, top_losses,
                         write_report)
    from .runs import RunData, RunStore, StoredRun
    from .experiments.sweep import list_sweeps, load_sweep, plan_sweep, run_sweep, sweep_table
    from .config import RunConfig
    from .train import RunResult, fit_run, learner, resume_run


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'fastcls' has no attribute {name!r}")
