"""The CLI's one table printer: a DataFrame as a rich Table (numbers right-aligned, the best row in bold green).

Cells and titles are plain text (the CLI's consoles print without markup), so a run named `[red]x` shows as is.
"""

__all__ = ["table"]

from typing import Optional

from rich.table import Table


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
