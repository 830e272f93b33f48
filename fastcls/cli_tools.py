"""Commands that need no training: `fastcls predict` and `fastcls export` (`fastcls.inference`) and `fastcls doctor`
(`fastcls.doctor`), registered on the app by `register`: the same thin commands as `fastcls.cli`'s, in their own
module."""

__all__ = ["register"]

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_options import Bs, OnBadImage, RunRef, RunsDir


def register(app: typer.Typer, cli, out, table):
    """Add the commands to `app`, each wrapped by `cli` (FastclsError -> one paragraph, exit 2), printing to `out`
    (tables made by `table`)."""
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
