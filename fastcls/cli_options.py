"""The CLI's shared options: one `Annotated` alias per option, so every command spells it the same way."""

import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["RunsDir", "RecipeDirs", "Quiet", "Data", "Size", "Ps", "Epochs", "FreezeEpochs", "Lr", "Bs", "Seed",
           "Tta", "Pretrained", "Weights", "Name", "Sample", "Crop", "Trim", "OnBadImage", "RunRef", "PsGrid",
           "Fast", "Views", "Imbalance", "LabelSmoothing", "TuneThresholds", "Cache", "Workers", "Amp",
           "ChannelsLast", "Compile", "Folds", "Fold", "Runs", "StudentArch", "DropPath", "Executor", "Address",
           "GpusPerTrial", "CpusPerTrial", "Distributed", "Out", "LayerDecay", "BnStats",
           "ArchOpt", "Wd", "Patience", "ValidPct", "RunDropPath", "Normalize", "Aug", "Sets", "SplitSeed",
           "MixUpOpt", "CutMixOpt", "MixOffEpoch", "EmaOpt", "Opt", "Momentum", "Sched", "Warmup", "TtaViews", "Accum", "RECIPE_FLAGS", "recipe_flags", "Track"]

# -- shared options --------------------------------------------------------------------------------------
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Run store folder (holds index.sqlite and one folder per run).",
                                       envvar="FASTCLS_RUNS")]
RecipeDirs = Annotated[Optional[list[Path]], typer.Option("--recipes", help="Extra folder of recipe files (repeatable); "
                                                          "wins over built-in and ./recipes on a name clash.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing while training; only the final table.")]
Data = Annotated[Optional[Path], typer.Option("--data", help="Data folder (default: the recipe's own).")]
def _sizes(text: str):
    """--size as typed: one size (int), or several for progressive resizing (a tuple)."""
    from .errors import FastclsError
    from .recipe import parse_sizes
    try:
        vals = parse_sizes(text)
    except FastclsError as e:
        raise typer.BadParameter(str(e)) from None
    return vals[0] if len(vals) == 1 else vals


Size = Annotated[Optional[int], typer.Option("--size", parser=_sizes, help="Image size in pixels (default: the "
                                             "recipe's); several, comma-separated, resize progressively (128,224: "
                                             "train splits the epochs between them, the last is the final size; "
                                             "cache and show-batch do each size).")]
Ps = Annotated[Optional[float], typer.Option("--ps", help="Head dropout probability (default: the recipe's).")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="Epochs of the unfrozen stage.")]
FreezeEpochs = Annotated[Optional[int], typer.Option("--freeze-epochs", help="Epochs of the frozen stage (head only; "
                                                     "used with pretrained weights).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Maximum learning rate (the body gets lr/100..lr).")]
Bs = Annotated[Optional[int], typer.Option("--bs", help="Batch size.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed for the init, augmentation and batch order (the "
                                    "validation split and folds have their own: --split-seed).")]
Tta = Annotated[Optional[int], typer.Option("--tta", help="Augmented TTA views stored beside the plain prediction.")]
Pretrained = Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from pretrained "
                                                    "weights (timm online, or the local weights folder).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="Local pretrained weights file (.safetensors/.pth).")]
Name = Annotated[Optional[str], typer.Option("--name", help="Run name (default: recipe-arch-<id suffix>).")]
Sample = Annotated[Optional[int], typer.Option("--sample", help="Train on a stratified subset of N items (quick checks).")]
Crop = Annotated[Optional[str], typer.Option("--crop", help="Crop of the original image before resizing: 'trim' (the "
                                             "recipe's margins, see --trim), 'center' (central square) or 'none'.")]
Trim = Annotated[Optional[str], typer.Option("--trim", help="Trim margins top,bottom,left,right: pixels "
                                             "(400,100,50,50) or fractions of the original (0.2,0.05,0.05,0.05); "
                                             "implies --crop trim.")]
OnBadImage = Annotated[str, typer.Option("--on-bad-image", help="Unreadable images (found before training): 'fail' "
                                         "lists them and stops; 'skip' leaves them out with a warning.")]
RunRef = Annotated[str, typer.Argument(help="Run id, unique id prefix, or run name.")]
# sweeps: comma-separated grids, and the fast path
PsGrid = Annotated[Optional[str], typer.Option("--ps", help="Head dropout values, comma-separated, e.g. 0.1,0.2,0.4 "
                                               "(sweep-dropout default: the recipe's ps_grid).")]
Fast = Annotated[Optional[bool], typer.Option("--fast/--full", help="--fast trains only the head, for the frozen "
                                              "stage's epochs, on body features cached under RUNS/cache (unfrozen "
                                              "epochs are not run); --full trains every trial as a normal run. "
                                              "Default: --fast when --epochs is 0.")]
Views = Annotated[Optional[int], typer.Option("--views", help="Augmented views of the training set cached for --fast "
                                              "(default: one per frozen epoch).")]
Imbalance = Annotated[Optional[str], typer.Option("--imbalance", help="Class-imbalance handling, comma-combinable: none, "
                                                  "weights, focal, ldam, soft-f1, drw, oversample, logit-adjust (default: the recipe's).")]
LabelSmoothing = Annotated[Optional[float], typer.Option("--label-smoothing", help="Label smoothing epsilon in [0, 1) "
                                                         "(default: the recipe's).")]
TuneThresholds = Annotated[Optional[bool], typer.Option("--tune-thresholds/--no-tune-thresholds", help="Fit per-class "
                                                        "offsets for macro-F1 on valid; apply them to the stored "
                                                        "predictions (default: the recipe's).")]
Cache = Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Pre-resized images: the disk cache "
                                               "($FASTCLS_CACHE; default: on for image files > 2x the size) and one "
                                               "in-memory copy when it fits in 1 GiB; --no-cache turns both off.")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=0, help="DataLoader worker processes (default: 0 on "
                                                "CPU, where the model needs the cores; cores-1 with a GPU).")]
Amp = Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision (default: on with a GPU: bf16, or "
                                             "fp16 where bf16 is unsupported; --amp on CPU runs bf16 autocast).")]
ChannelsLast = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Channels-last memory "
                                                      "format (default: on with a GPU, off on CPU).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model (slow to start; off by default).")]
# k-fold, students, probes (fastcls.cv, fastcls.student, fastcls.probe)
Folds = Annotated[Optional[int], typer.Option("--folds", help="K-fold: one run per fold plus a parent 'cv' run holding "
                                              "the out-of-fold valid and fold-averaged test probabilities "
                                              "(stratified; grouped where the recipe splits by group).")]
Fold = Annotated[Optional[int], typer.Option("--fold", help="With --folds: train only this fold (0..K-1); the cv run "
                                             "is stored once every fold is.")]
Runs = Annotated[list[str], typer.Argument(help="Run ids, unique id prefixes or names (a cv or ensemble run too).")]
StudentArch = Annotated[Optional[str], typer.Option("--arch", help="The student's architecture (default: the first "
                                                    "teacher run's).")]
DropPath = Annotated[Optional[float], typer.Option("--drop-path", help="Stochastic depth rate of the student (timm "
                                                   "archs that have it; default: the recipe's, 0.1 for pseudo-label).")]
# executors: where independent trials (sweep points, folds) run
Executor = Annotated[str, typer.Option("--executor", help="'local': trials one after another here; 'ray': each trial "
                                       "a Ray task (pip install fastcls[ray]), results stored by this process.")]
Address = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (e.g. auto, HOST:6379, "
                                                "ray://HOST:10001); default $RAY_ADDRESS, else a local instance.")]
GpusPerTrial = Annotated[Optional[float], typer.Option("--gpus-per-trial", help="GPUs each Ray trial reserves "
                                                       "(fractions share one; default 0).")]
CpusPerTrial = Annotated[Optional[float], typer.Option("--cpus-per-trial", help="CPUs each Ray trial reserves "
                                                       "(default 1).")]
Distributed = Annotated[bool, typer.Option("--distributed", help="Require several processes for this one run "
                                            "(started by `accelerate launch` or `torchrun`; only rank 0 stores and "
                                            "prints).")]
Out = Annotated[Optional[Path], typer.Option("--out", help="PNG file to write (default: <runs-dir>/pictures/...).")]
LayerDecay = Annotated[Optional[float], typer.Option("--layer-decay", help="Layer-wise LR decay for the unfrozen stage, "
                                                    "e.g. 0.8: one group per body stage, each 0.8x the next one's "
                                                    "lr (default: discriminative LRs lr/100..lr).")]
BnStats = Annotated[Optional[str], typer.Option("--bn-stats", help="'keep' the body's batch-norm statistics as "
                                                "loaded (training and fast path), or 'reestimate' them on training "
                                                "images (default 'auto': keep for a pretrained body).")]

# the training toolkit: every recipe setting from the command line (named flags for the common ones, --set for all)
ArchOpt = Annotated[Optional[str], typer.Argument(help="Architecture (see `fastcls archs`; default: the recipe's "
                                                  "first arch).")]
Wd = Annotated[Optional[float], typer.Option("--wd", help="Weight decay (default: the recipe's, else fastai's).")]
Patience = Annotated[Optional[int], typer.Option("--patience", help="Early stopping: epochs without improvement of the "
                                                 "monitored metric (default: the recipe's; off when unset).")]
ValidPct = Annotated[Optional[float], typer.Option("--valid-pct", help="Validation fraction in (0, 1) for a random or "
                                                   "stratified split (default: the recipe's).")]
RunDropPath = Annotated[Optional[float], typer.Option("--drop-path", help="Stochastic depth rate (timm archs that have "
                                                      "it; default: the recipe's).")]
Normalize = Annotated[Optional[str], typer.Option("--normalize", help="Input normalisation: model, imagenet, dataset "
                                                  "or none (default: the recipe's).")]
Aug = Annotated[Optional[str], typer.Option("--aug", help="Augmentation strength: none, light, default (the "
                                            "recipe's) or strong (see fastcls.recipe.AUG_PRESETS).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Any recipe setting, field=value (repeatable), e.g. "
                                                   "--set max_rotate=15 --set archs=resnet18,resnet34; validated "
                                                   "like a recipe file; the run's config records it.")]
SplitSeed = Annotated[Optional[int], typer.Option("--split-seed", help="Seed of the validation split, folds and "
                                                  "--sample subset (default: the recipe's split_seed, fixed), so runs "
                                                  "differing only in --seed share validation items.")]

MixUpOpt = Annotated[Optional[float], typer.Option("--mixup", help="MixUp with Beta(A, A) mixing weights, e.g. 0.4 "
                                                   "(fastai's MixUp; default: the recipe's, 0 = off).")]
CutMixOpt = Annotated[Optional[float], typer.Option("--cutmix", help="CutMix with Beta(A, A) patch areas, e.g. 1.0 "
                                                    "(fastai's CutMix; default: the recipe's, 0 = off).")]
MixOffEpoch = Annotated[Optional[int], typer.Option("--mix-off-epoch", help="Train the last N epochs of the last "
                                                    "stage without mixing (default: the recipe's, 0).")]
EmaOpt = Annotated[Optional[float], typer.Option("--ema", help="Keep an exponential moving average of the weights "
                                                "during the unfrozen stage with this decay, e.g. 0.999; the run keeps "
                                                "the raw or the averaged model, whichever scores better on valid.")]
Opt = Annotated[Optional[str], typer.Option("--opt", help="Optimizer: adamw (fastai's default Adam), adam (L2 "
                                            "weight decay), sgd, lamb or ranger (default: the recipe's).")]
Momentum = Annotated[Optional[float], typer.Option("--momentum", help="Adam's beta1 / SGD's momentum, kept constant "
                                                   "(default: the optimizer's; --set nesterov=true for SGD).")]
Sched = Annotated[Optional[str], typer.Option("--sched", help="LR schedule of each stage: one-cycle, cosine, flat-cos, "
                                              "step, exp or plateau (--set lr_gamma/lr_step/lr_patience; default: "
                                              "the recipe's).")]
Warmup = Annotated[Optional[float], typer.Option("--warmup", help="Epochs of linear warm-up from lr/25 at the start of "
                                                 "each stage (one-cycle: its rising part).")]
TtaViews = Annotated[Optional[str], typer.Option("--tta-views", help="Deterministic TTA views stored beside the "
                                                 "plain prediction, comma-separated: flip (mirror), crop5 (4 corners "
                                                 "+ centre), scale (zoomed in and out); before the --tta random ones; "
                                                 "none: no deterministic view.")]
Accum = Annotated[Optional[int], typer.Option("--accum", help="Gradient accumulation: one optimizer step per N "
                                              "micro-batches of --bs items (effective batch bs x N; default: the "
                                              "recipe's, 1).")]

RECIPE_FLAGS = {"wd": Wd, "patience": Patience, "valid_pct": ValidPct, "drop_path": RunDropPath, "normalize": Normalize,
                "aug": Aug, "sets": Sets, "split_seed": SplitSeed, "mixup": MixUpOpt, "cutmix": CutMixOpt,
                "mix_off_epoch": MixOffEpoch, "ema": EmaOpt,
                "opt": Opt, "momentum": Momentum, "sched": Sched, "warmup": Warmup, "tta_views": TtaViews,
                "accum": Accum}


Track = Annotated[Optional[str], typer.Option("--track", help="Log every run this command stores to an experiment "
                                             "tracker: 'mlflow' ($FASTCLS_MLFLOW_URI, default sqlite:///mlruns.db "
                                             "beside the runs folder; pip install 'fastcls[mlflow]').")]


def recipe_flags(fn):
    """Give a command every option of `RECIPE_FLAGS`; they reach it as one dict, its `flags` parameter (for
    `RunConfig.from_options(..., **flags)`), so the commands that build a run config offer the same flags.
    The command also gets `--track` (`fastcls.tracking.tracked`): the runs it stores are logged to MLflow."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "flags"]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
               for k, a in {**RECIPE_FLAGS, "track": Track}.items()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .tracking import tracked
        flags = {k: kwargs.pop(k, None) for k in RECIPE_FLAGS}
        with tracked(kwargs.pop("track", None)):
            return fn(*args, flags=flags, **kwargs)
    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "flags"}, **RECIPE_FLAGS,
                               "track": Track}
    return wrapper


# -- competition metrics and calibration (docs/guide/metrics.md)
__all__ += ["Calibrate", "CalibrateEnsemble", "MetricOpt"]
Calibrate = Annotated[Optional[bool], typer.Option("--calibrate/--no-calibrate", help="Fit temperature scaling on "
                                                   "valid (log likelihood) and apply it to the stored probabilities "
                                                   "(default: the recipe's).")]
MetricOpt = Annotated[Optional[str], typer.Option("--metric", help="Registry metric to optimise and score, e.g. map@3, "
                                                  "log_loss, top5, f2, qwk (default: the recipe's monitor, else its "
                                                  "metric).")]
CalibrateEnsemble = Annotated[bool, typer.Option("--calibrate", help="Temperature-scale the ensemble's probabilities "
                                                 "(fitted on its stored valid rows).")]
