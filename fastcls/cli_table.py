"""The CLI's consoles and its one table printer: a DataFrame as a rich Table (numbers right-aligned, the best row in
bold green).

Cells and titles are plain text (the consoles print without markup; a caller that passes markup=True escapes user
text), so a run named `[red]x` shows as is. Off a terminal (a pipe, a log, a notebook's `!fastcls`) tables are laid
out 200 columns wide and error messages are not wrapped at all, so a path or a suggested command stays on one line.
"""

__all__ = ["table", "out", "err"]

import sys
from typing import Optional

from rich.console import Console
from rich.table import Table

# rich wraps at 80 columns when not on a terminal; logs and CliRunner get the full table instead
out = Console(width=None if sys.stdout.isatty() else 200, markup=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200, markup=False,
              soft_wrap=not sys.stderr.isatty())  # errors off a terminal: one line each, never wrapped


def table(df, title: str = "", best_col: Optional[str] = None) -> Table:
    t = Table(title=title, title_justify="left")
    for c in df.columns:
        t.add_column(str(c), justify="right" if df[c].dtype.kind in "fiu" else "left")
    best = df[best_col].idxmax() if best_col and best_col in df and df[best_col].notna().any() else None
    for i, row in df.iterrows():
        cells = [("" if v is None or (isinstance(v, float) and v != v) else (f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else str(v))
                 for v in row]
        t.add_row(*cells, style="bold green" if i == best else None)
    return t
