"""Commands that need no training: `fastcls check` (`fastcls.data.check_data`), `fastcls predict` and `fastcls
export` (`fastcls.inference`) and `fastcls doctor` (`fastcls.doctor`), registered on the app by `register`: the same thin commands as `fastcls.cli`'s, in their own
module."""

__all__ = ["register"]

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .cli_options import Bs, Crop, Data, OnBadImage, RecipeDirs, RunRef, RunsDir, Trim


def register(app: typer.Typer, cli, out, table):
    """Add the commands to `app`, each wrapped by `cli` (FastclsError -> one paragraph, exit 2), printing to `out`
    (tables made by `table`)."""
    @app.command("check")
    @cli
    def check_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
                  data: Data = None, recipes: RecipeDirs = None, crop: Crop = None, trim: Trim = None,
                  no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip opening every image (faster on "
                                                          "large data; unreadable files go unnoticed).")] = False):
        """Validate a data folder against a recipe (layout, class counts, unreadable files, unknown labels, what a
        --crop / --trim leaves of each image); no training.

        Exit status 0 when training would work, 1 when the folder has problems.
        """
        from .data import check_data
        from .recipe import crop_overrides, get_recipe
        r = get_recipe(recipe, recipes or ()).override(**crop_overrides(crop, trim))
        rep = check_data(r, data, verify_images=not no_verify)
        out.print(f"[bold]Recipe {escape(rep.recipe)}[/] (layout {rep.layout}) on {escape(str(rep.path))}",
                  highlight=False, markup=True)
        if len(rep.counts):
            df = rep.counts if rep.counts["valid"].any() else \
                rep.counts[["class", "total"]].rename(columns={"total": "images"})
            out.print(table(df.astype({c: int for c in df.columns if c != "class"})))
            out.print(f"{len(df)} classes, {int(rep.counts['total'].sum())} labelled images, {rep.n_test} test images.")
        for kind, texts in (("[yellow]Warning:[/]", rep.warnings), ("[bold red]Problem:[/]", rep.problems)):
            for t in texts:
                out.print(f"{kind} {escape(t)}", highlight=False, markup=True)
        if not rep.ok:
            out.print(f"{len(rep.problems)} problem(s): training on this folder would fail.")
            raise typer.Exit(1)
        out.print("OK: the data folder matches the recipe.")

    @app.command("predict")
    @cli
    def predict_cmd(run: Annotated[str, typer.Argument(help="Run id, prefix or name (a cv run or ensemble too), "
                                                      "or a folder written by `fastcls export`.")],
                    data: Annotated[Optional[Path], typer.Option(
                        "--data", help="The recipe's data folder (its test layout), a folder of images, or a CSV of "
                        "image paths (default: the run's data).")] = None,
                    out_file: Annotated[Optional[Path], typer.Option("--out", help="Submission CSV to write.")] = None,
                    probs: Annotated[Optional[Path], typer.Option(
                        "--probs", help="Also write ids, vocab and probabilities as .npz.")] = None,
                    bs: Bs = None,
                    device: Annotated[Optional[str], typer.Option(
                        "--device", help="cpu, cuda, cuda:1 (default: a GPU when there is one).")] = None,
                    no_tta: Annotated[bool, typer.Option("--no-tta", help="Plain view only.")] = False,
                    runtime: Annotated[str, typer.Option(
                        "--runtime", help="torch, or onnx: the ONNX models of a folder written by `fastcls export "
                        "--onnx`, run with onnxruntime (plain views only).")] = "torch",
                    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
                    on_bad_image: OnBadImage = "fail", runs_dir: RunsDir = Path("runs")):
        """Predict new images with a stored run, cv run or ensemble, or an exported folder; write the submission."""
        from .inference import predict
        res = predict(runs_dir, run, data=data, out=out_file, probs_out=probs, bs=bs, device=device, tta=not no_tta,
                      on_bad_image=on_bad_image, runtime=runtime, progress=False if quiet else None)
        out.print(f"Predicted {len(res.ids)} images with {len(res.members)} member(s)"
                  + (f"; wrote {out_file}" if out_file else "") + (f" and {probs}" if probs else "")
                  + (f"; {len(res.bad)} unreadable image(s) given the others' prior" if res.bad else "") + ".",
                  highlight=False)

    @app.command("export")
    @cli
    def export_cmd(run: RunRef, out_dir: Annotated[Path, typer.Option("--out", help="New folder to write.")],
                   onnx: Annotated[bool, typer.Option("--onnx", help="Also each model as ONNX (opset 17, dynamic "
                                                      "batch) for `fastcls predict DIR --runtime onnx`.")] = False,
                   with_wheel: Annotated[bool, typer.Option("--with-wheel", help="Also the wheel of this fastcls, to "
                                                            "install offline.")] = False,
                   runs_dir: RunsDir = Path("runs")):
        """Write a run, cv run or ensemble as a self-contained folder `fastcls predict DIR --data PATH` runs offline."""
        from .inference import export
        folder = export(runs_dir, run, out_dir, onnx=onnx, wheel=with_wheel)
        out.print(f"Exported {run} to {folder}. Predict with: fastcls predict {folder} --data PATH --out "
                  "submission.csv", highlight=False)

    @app.command("doctor")
    @cli
    def doctor_cmd(runs_dir: RunsDir = Path("runs"),
                   fix: Annotated[bool, typer.Option("--fix", help="Rebuild the index and mark damaged runs 'broken' "
                                                     "(nothing is deleted).")] = False):
        """Check a run store (index vs folders, run files present and loadable, ids inside it); exit 1 on problems."""
        from .doctor import diagnose
        d = diagnose(runs_dir, fix=fix)
        out.print(*([table(d.table(), title=f"Problems in {runs_dir}")] if d.problems else []),
                  *(f"Fixed: {f}" for f in d.fixed), d.summary(), sep="\n", highlight=False)
        raise typer.Exit(1 if d.problems and not d.fixed else 0)
