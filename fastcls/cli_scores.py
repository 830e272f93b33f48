"""CLI commands for leaderboard bookkeeping (`fastcls lb`); `fastcls.cli` registers them on its app."""

__all__ = ["lb_cmd", "lb_columns"]

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .cli_options import RunsDir

out = Console(width=None if sys.stdout.isatty() else 200)


def lb_columns(df) -> list:
    """The leaderboard score columns a runs table has (`fastcls.submission.with_lb_scores`)."""
    return [c for c in ("public", "private") if c in df]


def lb_cmd(target: Annotated[str, typer.Argument(help="A submission CSV written from this store, or a run (id, prefix "
                                                 "or name: its newest submission).")],
           public: Annotated[Optional[float], typer.Option("--public", help="Public leaderboard score.")] = None,
           private: Annotated[Optional[float], typer.Option("--private", help="Private leaderboard score.")] = None,
           runs_dir: RunsDir = Path("runs")):
    """Record a submission's leaderboard scores against the run that wrote it (`fastcls runs` shows them)."""
    from .runs import RunStore
    from .submission import record_lb
    rec = record_lb(RunStore(runs_dir), target, public, private)
    out.print(f"Run {rec['run']}: local {rec['metric_name']} {rec['local']}, public {rec['public']}, "
              f"private {rec['private']} ({Path(rec['file']).name}, sha256 {rec['sha256'][:12]})", highlight=False)
