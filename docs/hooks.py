"""mkdocs hook: renders the CLI reference from the typer app and the recipe fields from `Recipe` at build time, so the
pages cannot drift from `--help` and the code."""

__all__ = ["on_page_markdown", "recipe_fields"]

import inspect
import re

import typer
from typer.testing import CliRunner

MARKER = "<!-- cli-reference -->"
WIDTH = "118"  # wide enough for the option tables, narrow enough for the page's code blocks


def _help(app: typer.Typer, args: list[str]) -> str:
    """What `fastcls ARGS --help` prints, without colours."""
    res = CliRunner().invoke(app, [*args, "--help"], prog_name="fastcls",
                             env={"COLUMNS": WIDTH, "TERMINAL_WIDTH": WIDTH, "NO_COLOR": "1"})
    if res.exit_code != 0:
        raise RuntimeError(f"`fastcls {' '.join(args)} --help` failed: {res.output}")
    return res.output.rstrip()


def _render(app: typer.Typer, cmd, path: list[str]) -> list[str]:
    """Markdown sections for `cmd` and, for a group, every sub-command in the order the app declares them."""
    level = "#" * min(len(path) + 2, 4)
    out = [f"{level} `{' '.join(['fastcls', *path])}`", "", "```text", _help(app, path), "```", ""]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += _render(app, sub, path + [name])
    return out


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill the generated parts: the help of every command, the table of recipe fields."""
    if FIELDS_MARKER in markdown:
        markdown = markdown.replace(FIELDS_MARKER, recipe_fields())
    if MARKER in markdown:
        from fastcls.cli import app  # only the page that needs it pays for the import
        markdown = markdown.replace(MARKER, "\n".join(_render(app, typer.main.get_command(app), [])))
    return markdown


FIELDS_MARKER = "<!-- recipe-fields -->"
_FIELD = re.compile(r"^    (\w+): (.+?)(?: = (.+?))?(?:\s+# (.*))?$")
_SECTION = re.compile(r"^    # -- (.*)$")


def recipe_fields() -> str:
    """Markdown tables of `Recipe`'s fields, read from its source: the field, its type, its default and its comment."""
    from fastcls.recipe import Recipe
    out = ["**Name**", "", "| field | type | default | notes |", "|---|---|---|---|"]
    for line in inspect.getsource(Recipe).splitlines():
        if m := _SECTION.match(line):
            out += ["", f"**{m.group(1)[0].upper()}{m.group(1)[1:]}**", "", "| field | type | default | notes |",
                    "|---|---|---|---|"]
        elif m := _FIELD.match(line):
            name, tp, default, note = m.groups()
            cell = f"`{default}`" if default else "required"
            out.append(f"| `{name}` | `{tp}` | {cell.replace('|', '&#124;')} | {(note or '').replace('|', '&#124;')} |")
    return "\n".join(out)
