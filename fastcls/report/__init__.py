"""Reports: figures of runs (`plots`), previews of batches and the LR finder (`previews`), HTML pages (`pages`).

The figure helpers shared with sweeps (`DPI`, `ReportFigure`, `save_figure`, `plot_sweep`, `sweep_plot`) live in
`fastcls.plots`, below `fastcls.experiments`, and are part of this package's API too.
"""

from ..plots import DPI, ReportFigure, plot_sweep, save_figure, sweep_plot
from .pages import Report, sweep_results, write_report, write_sweep_report
from .plots import (HEADER_PX, PANEL_PX, confusion, confusion_figsize, grid_shape, per_class, per_class_figsize,
                    plot_confusion, plot_history, plot_members, plot_per_class, plot_top_losses, short_label,
                    top_losses)
from .scores import (CvLb, calibration_section, cv_lb_table, cv_vs_lb, plot_cv_lb, plot_reliability,
                     reliability_table)
from .previews import LrFind, find_lr, lr_find, plot_batch, plot_lr_find, preview_batch, save_batches

__all__ = ["CvLb", "calibration_section", "cv_lb_table", "cv_vs_lb", "plot_cv_lb", "plot_reliability",
           "reliability_table", "DPI", "HEADER_PX", "LrFind", "find_lr", "PANEL_PX", "Report", "ReportFigure", "confusion", "confusion_figsize",
           "grid_shape", "lr_find", "per_class", "per_class_figsize", "plot_batch", "plot_confusion", "plot_history",
           "plot_lr_find", "plot_members", "plot_per_class", "plot_sweep", "plot_top_losses", "preview_batch",
           "save_batches", "save_figure", "short_label", "sweep_plot", "sweep_results", "top_losses", "write_report",
           "write_sweep_report"]
