"""Reports: plots of runs and sweeps, previews (batches, lr_find), HTML pages."""

from .core import (DPI, HEADER_PX, LrFind, PANEL_PX, Report, ReportFigure, confusion, confusion_figsize, grid_shape,
                   lr_find, per_class, per_class_figsize, plot_batch, plot_confusion, plot_history, plot_lr_find,
                   plot_members, plot_per_class, plot_sweep, plot_top_losses, preview_batch, run_config, save_figure,
                   short_label, sweep_plot, sweep_results, top_losses, write_report, write_sweep_report)

__all__ = ["DPI", "HEADER_PX", "LrFind", "PANEL_PX", "Report", "ReportFigure", "confusion", "confusion_figsize",
           "grid_shape", "lr_find", "per_class", "per_class_figsize", "plot_batch", "plot_confusion", "plot_history",
           "plot_lr_find", "plot_members", "plot_per_class", "plot_sweep", "plot_top_losses", "preview_batch",
           "run_config", "save_figure", "short_label", "sweep_plot", "sweep_results", "top_losses", "write_report",
           "write_sweep_report"]
