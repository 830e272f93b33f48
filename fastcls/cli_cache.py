"""CLI command for the pre-resized image cache (`fastcls cache`); `fastcls.cli` registers it on its app."""

__all__ = ["cache_cmd"]

from typing import Annotated, Optional

import typer

from .cli_options import Data, RecipeDirs, Size
from .cli_table import out


def cache_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
              data: Data = None, size: Size = None, recipes: RecipeDirs = None,
              cache_budget: Annotated[Optional[str], typer.Option(
                  "--cache-budget", help="Disk the cache may use, e.g. 20G: raw arrays when they fit, else lossless "
                  "PNG (default: the recipe's cache_budget, else the free space).")] = None):
    """Fill the pre-resized image cache: decode, crop and resize every train and test image once, at --size (at each
    size of a progressive --size 128,224, as its training reads them)."""
    from .budget import human_bytes
    from .data import read_items
    from .data.cache import fill_caches
    from .recipe import get_recipe, size_overrides
    r = get_recipe(recipe, recipes or ())
    r = r.override(**size_overrides(size), **({"cache_budget": cache_budget} if cache_budget is not None else {}))
    for st in fill_caches(r, read_items(r, data)):
        out.print(f"{st.total} images at {st.size} px (crop {r.crop}, {st.format}): {st.written} written, {st.hits} "
                  f"already cached. {st.folder} holds {human_bytes(st.bytes)}.", highlight=False)
