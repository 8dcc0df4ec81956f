"""lbo compare: train recipes side by side on real data and print what was measured.

Each (recipe, batch size) run trains a fresh model in a fresh child process (forked from a server that
imported torch and Lightning once), so that its peak memory (max RSS) is its own and no state leaks
between runs. Validation accuracy is recorded against optimizer steps and training wall time
(validation loops excluded; everything else, including the recipes' callbacks, counted); the table
shows final accuracy, steps and seconds to the target accuracy ("-" when never reached), time per
step and peak memory. A recipe that ends below plain SGD at the same batch gets a note saying why.
Results go to <out_dir>/results.csv, history.csv and accuracy.png.

The defaults are those of make demo: the SGD baseline at batch 256 (the papers' reference batch), then the
SGD recipe, Goyal, LARS and K-FAC at global batch 4096, on all 60k Fashion-MNIST images for 3 epochs with an
MLP-BN, one torch thread per run (about a minute on 2 cores): SGD with the linear scaling rule loses
accuracy at the large batch, LARS and K-FAC keep most or nearly all of it. Your own model and data can
be trained instead (--module pkg.mod:Class --datamodule pkg.mod:Class): the recipe replaces the module's
configure_optimizers; the data module must take a batch_size (per device) argument and the module must
log the monitored accuracy (--monitor, default val_acc) during validation.
"""
from __future__ import annotations

import argparse
import csv
import functools
import importlib
import inspect
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RECIPES = "sgd,goyal,lars,kfac"
DEFAULT_BATCH, DEFAULT_BASELINE_BATCH, DEFAULT_EPOCHS = 4096, 256, 3  # `make demo` (docs/compare.md)
#: One torch thread per training run: the demo's runs are small, and where other jobs share the cores a
#: run with one thread per core was several times slower per step (docs/compare.md, "The numbers").
DEFAULT_THREADS = 1
FASHION_MNIST_TRAIN = 60000
DATASETS = ("fashion-mnist",)
#: The keys of :data:`lightning_lbo.recipes.RECIPES` (tested equal), named here so that building the parser
#: (``lbo compare --help``) does not import the recipes, and with them torch.
RECIPE_NAMES = ("sgd", "goyal", "lars", "lamb", "akiba", "kfac", "spngd", "absa")
#: ``--model`` choices: reference model name and its keyword arguments (lightning_lbo.models).
MODELS = {"cnn": ("cnn", {}), "mlp-bn": ("mlp", {"batch_norm": True}), "mlp": ("mlp", {}), "resnet": ("resnet", {}),
          "resnet8": ("resnet", {"depth": 8})}


@dataclass
class RunSpec:
    """One training run of a comparison."""

    recipe: str
    batch_size: int
    epochs: int
    recipe_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = "cnn"
    module: str | None = None
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    datamodule: str | None = None
    datamodule_kwargs: dict[str, Any] = field(default_factory=dict)
    monitor: str = "val_acc"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    data_dir: str | None = None
    train_subset: int | None = None
    eval_every: int = 0
    seed: int = 0
    threads: int = 0
    progress: bool | None = None
    accelerator: str = "cpu"
    #: training images held out for validation (model selection); 0 validates on the test split.
    val_size: int = 0
    #: evaluate on the test split once after training (``RunResult.test_acc``).
    test: bool = False


@dataclass
class RunResult:
    recipe: str
    batch_size: int
    steps: int
    final_acc: float
    best_acc: float
    steps_to_target: int | None
    seconds_to_target: float | None
    seconds_per_step: float
    peak_rss_mb: float
    train_seconds: float = math.nan
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train seconds, val acc)
    error: str = ""
    test_acc: float = math.nan
    train_examples: int = 0  # size of the training set (0: unknown)
    #: K-FAC statistics refreshes done and possible (steps x statistics), when the run used K-FAC.
    kfac_refreshes: dict[str, int] = field(default_factory=dict)
    #: the recipe's ``Recipe.paper_batch``: (batch, training images, data set) of its paper's largest batch.
    paper_batch: tuple[int, int, str] | None = None


def _make_history_class() -> type:
    from typing_extensions import override

    from lightning_lbo.compat import callback_bases

    class History(*callback_bases()):
        """Records (optimizer step, training wall seconds, monitored accuracy) at every validation.

        Training wall time runs from ``on_train_start`` and excludes validation loops. Global rank 0
        writes the records to ``path`` (JSON) so that they survive ``ddp_spawn`` workers.
        """

        def __init__(self, monitor: str = "val_acc", path: str | None = None) -> None:
            self.monitor, self.path = monitor, path
            self.records: list[tuple[int, float, float]] = []
            self.start = self.val_start = 0.0
            self.val_seconds = 0.0
            self.steps = 0
            self.train_seconds = 0.0

        def _elapsed(self) -> float:
            return time.perf_counter() - self.start - self.val_seconds

        @override
        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        @override
        def on_validation_start(self, trainer, pl_module) -> None:
            self.val_start = time.perf_counter()

        @override
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            self.val_seconds += time.perf_counter() - self.val_start
            if self.monitor not in trainer.callback_metrics:
                raise KeyError(f"The module did not log {self.monitor!r} during validation; logged: "
                               f"{sorted(trainer.callback_metrics)}. Pass --monitor with one of them.")
            acc = float(trainer.callback_metrics[self.monitor])
            self.records.append((trainer.global_step, self._elapsed(), acc))
            self._write(trainer)

        @override
        def on_train_end(self, trainer, pl_module) -> None:
            self.steps, self.train_seconds = trainer.global_step, self._elapsed()
            self._write(trainer)

        def _write(self, trainer) -> None:
            if self.path and trainer.is_global_zero:
                with open(self.path, "w") as fh:
                    json.dump({"records": self.records, "steps": self.steps or trainer.global_step,
                               "train_seconds": self.train_seconds or self._elapsed()}, fh)

    History.__module__ = __name__
    History.__qualname__ = "History"
    return History


@functools.cache
def _history_class() -> type:
    return _make_history_class()


def __getattr__(name: str) -> Any:  # History is built lazily (imports Lightning); pickle finds it here
    if name == "History":
        return _history_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def import_object(path: str, what: str) -> Any:
    """Import ``"package.module:Name"``; errors say what was wrong with the path."""
    if path.count(":") != 1:
        raise ValueError(f"Invalid {what} path {path!r}: use 'package.module:ClassName'.")
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import {what} {path!r}: {err}. Is the package on PYTHONPATH?") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ValueError(f"{module_name} has no {attr!r} ({what} {path!r}); it defines: {', '.join(names)}.") from None


def _check_lightning_class(obj: Any, kind: str, path: str) -> None:
    from lightning_lbo.compat import available_packages, lightning_package

    bases = tuple(getattr(lightning_package(p), kind) for p in available_packages())
    if not (inspect.isclass(obj) and issubclass(obj, bases)):
        raise ValueError(f"{path!r} is not a {kind} subclass (got {obj!r}).")


def _call_recipe_optimizer(factory: Any, module: Any) -> Any:
    """Bound as a user module's ``configure_optimizers`` (a partial pickles for ``ddp_spawn``)."""
    return factory(module)


def _build_data(spec: RunSpec, per_device_batch: int) -> Any:
    if spec.datamodule:
        cls = import_object(spec.datamodule, "datamodule")
        return cls(batch_size=per_device_batch, **spec.datamodule_kwargs)
    from lightning_lbo.data import FashionMNISTDataModule

    return FashionMNISTDataModule(batch_size=per_device_batch, data_dir=spec.data_dir, train_subset=spec.train_subset,
                                  eval_batch_size=2048, drop_last=True, seed=spec.seed, val_size=spec.val_size)


def _build_module(spec: RunSpec, recipe: Any) -> Any:
    if spec.module:
        module = import_object(spec.module, "module")(**spec.module_kwargs)
        module.configure_optimizers = functools.partial(_call_recipe_optimizer, recipe.optimizer, module)
        return module
    from lightning_lbo.classifier import ClassifierModule

    name, model_kwargs = MODELS[spec.model]
    return ClassifierModule(name, optimizer=recipe.optimizer, model_kwargs=model_kwargs, **spec.module_kwargs)


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|litlogger|does not have many workers).*")


def run_one(spec: RunSpec, history_path: str | None = None) -> RunResult:
    """Train one recipe at one batch size and return the measurements (normally in a child process)."""
    import pytorch_lightning as pl
    import torch

    from lightning_lbo.recipes import build_recipe

    _quiet_lightning()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    pl.seed_everything(spec.seed, verbose=False)
    world = spec.devices * spec.num_nodes
    if spec.batch_size % world:
        raise ValueError(f"--batch-size {spec.batch_size} is not divisible by devices x nodes = {world}.")
    dm = _build_data(spec, spec.batch_size // world)
    dm.prepare_data()
    dm.setup("fit")
    per_device_batches = len(dm.train_dataloader())  # one process, no sampler split: per-device batches
    steps_per_epoch = per_device_batches // world
    if steps_per_epoch < 1:
        size = len(dm.train_set) if hasattr(dm, "train_set") else "the"
        raise ValueError(f"--batch-size {spec.batch_size} is larger than {size} training examples: lower it.")
    recipe = build_recipe(spec.recipe, global_batch_size=spec.batch_size, epochs=spec.epochs,
                          steps_per_epoch=steps_per_epoch, **spec.recipe_kwargs)
    module = _build_module(spec, recipe)
    own_file = history_path is None
    if own_file:
        fd, history_path = tempfile.mkstemp(suffix=".json", prefix="lbo-history-")
        os.close(fd)
    history = _history_class()(spec.monitor, history_path)
    eval_every = min(spec.eval_every or steps_per_epoch, steps_per_epoch)
    progress = sys.stderr.isatty() if spec.progress is None else spec.progress
    strategy = spec.strategy
    if strategy == "auto" and world > 1 and spec.num_nodes == 1 and "LOCAL_RANK" not in os.environ:
        strategy = "ddp_spawn"  # popen "ddp" would re-run the whole `lbo compare` command in every rank
    trainer = pl.Trainer(
        accelerator=spec.accelerator, devices=spec.devices, num_nodes=spec.num_nodes, strategy=strategy,
        max_epochs=spec.epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[*recipe.callbacks, history], val_check_interval=eval_every, num_sanity_val_steps=0,
        enable_progress_bar=progress,
    )
    try:
        trainer.fit(module, datamodule=dm)
        with open(history_path) as fh:
            measured = json.load(fh)
        test_acc = math.nan
        if spec.test:
            trainer.test(module, datamodule=dm, verbose=False)
            test_acc = float(trainer.callback_metrics["test_acc"])
    finally:
        if own_file:
            os.unlink(history_path)
    records = [tuple(r) for r in measured["records"]]
    steps = int(measured["steps"])
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return RunResult(
        recipe=spec.recipe, batch_size=spec.batch_size, steps=steps,
        final_acc=records[-1][2] if records else math.nan, best_acc=max((r[2] for r in records), default=math.nan),
        steps_to_target=None, seconds_to_target=None,
        seconds_per_step=measured["train_seconds"] / max(1, steps), peak_rss_mb=peak / 1024,
        train_seconds=measured["train_seconds"], history=records, test_acc=test_acc,
        train_examples=len(dm.train_set) if hasattr(dm, "train_set") else 0,
        kfac_refreshes=_kfac_refreshes(trainer.optimizers), paper_batch=recipe.paper_batch,
    )


def _kfac_refreshes(optimizers: Sequence[Any]) -> dict[str, int]:
    """Statistics refreshes K-FAC did and could have done (every statistic at every step), summed.

    Read from the preconditioners' checkpoint state (their stable interface), not their internals.
    """
    from lightning_lbo.optim.kfac import KFAC

    done = possible = 0
    for opt in optimizers:
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer
        if isinstance(opt, KFAC):
            state = opt.preconditioner.state_dict()
            for block in state["blocks"]:
                done += sum(block["refreshes"].values())
                possible += state["steps"] * len(block["refreshes"])
    return {"done": done, "possible": possible} if possible else {}


def _die_with_parent() -> None:
    """Linux: end this training process when its parent (the forkserver, which ends with ``lbo``) ends."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_main(spec: RunSpec, out_path: str) -> None:
    _die_with_parent()
    try:
        result: Any = run_one(spec)
    except BaseException as err:  # noqa: B036 - report every failure to the parent, then exit
        result = f"{type(err).__name__}: {err}"
    with open(out_path, "wb") as fh:
        pickle.dump(result, fh)


@functools.cache
def _context() -> Any:
    """A forkserver that imported torch and Lightning once (spawn where forkserver does not exist)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pytorch_lightning", "lightning_lbo.compare", "lightning_lbo.recipes"])
    return ctx


def _run_in_child(spec: RunSpec) -> RunResult:
    """Run ``run_one`` in a fresh (non-daemonic, so ``ddp_spawn`` may start workers) child process."""
    with tempfile.TemporaryDirectory(prefix="lbo-compare-") as tmp:
        out_path = os.path.join(tmp, "result.pkl")
        proc = _context().Process(target=_child_main, args=(spec, out_path))
        proc.start()
        try:
            proc.join()
        finally:  # Ctrl-C in the parent must not leave a training process behind
            if proc.is_alive():
                proc.terminate()
                proc.join()
        if not os.path.exists(out_path):
            raise RuntimeError(f"the training process died (exit code {proc.exitcode}); out of memory?")
        with open(out_path, "rb") as fh:
            result = pickle.load(fh)
    if isinstance(result, str):
        raise RuntimeError(result)
    return result


def reach_target(history: Sequence[tuple[int, float, float]], target: float) -> tuple[int | None, float | None]:
    """First (step, train seconds) at which validation accuracy >= target, or (None, None)."""
    for step, seconds, acc in history:
        if acc >= target:
            return step, seconds
    return None, None


def below_sgd_notes(results: Sequence[RunResult]) -> list[str]:
    """Why each recipe that ends below the ``sgd`` recipe at the same batch does so, one line each.

    The first suspect is the batch/data-set ratio: a recipe is only known to keep small-batch accuracy
    up to its paper's largest batch as a fraction of the paper's training set (Goyal et al.: 8192 of
    1.28M ImageNet images, 0.64%, which at Fashion-MNIST's 60k images is a batch of ~380).
    """
    sgd = {r.batch_size: r for r in results if r.recipe == "sgd" and not r.error}
    notes = []
    for r in results:
        base = sgd.get(r.batch_size)
        if r.recipe == "sgd" or r.error or base is None or not r.final_acc < base.final_acc:
            continue
        gap = base.final_acc - r.final_acc
        line = f"{r.recipe} ends {100 * gap:.1f} pp below sgd at batch {r.batch_size}"
        if r.paper_batch is not None and r.train_examples:
            paper_batch, paper_images, data = r.paper_batch
            fraction, ours = paper_batch / paper_images, r.batch_size / r.train_examples
            where = (f"{ours / fraction:.1f}x beyond" if ours > fraction else "within")
            line += (f": the batch is {ours:.2%} of the {r.train_examples} training images, {where} the largest "
                     f"ratio its paper kept small-batch accuracy at ({paper_batch} of {paper_images} {data} "
                     f"images = {fraction:.2%}, a batch of ~{fraction * r.train_examples:.0f} here)")
            if ours > fraction and r.recipe in ("goyal", "absa"):
                line += ("; the linear scaling rule's LR overshoots there (Goyal et al. saw it break past 8K "
                         "on ImageNet) and the step decay leaves few steps at full LR")
            elif ours <= fraction:
                line += f"; at {r.steps} steps its schedule is far shorter than the paper's"
        notes.append(line + ". Study: benchmarks/REPORT.md.")
    return notes


def format_table(results: Sequence[RunResult], target: float, baseline: RunResult | None = None) -> str:
    """The results as an aligned text table; with a ``baseline`` run, each final accuracy minus the baseline's."""
    compared = baseline is not None and not baseline.error
    header = ("recipe", "batch", "steps", "final acc", "best acc", f"steps to {target:.1%}",
              f"s to {target:.1%}", "s/step", "peak RSS MB")
    if compared:
        header = (*header[:4], f"vs sgd@{baseline.batch_size}", *header[4:])
    rows = [header]
    for r in results:
        if r.error:
            rows.append((r.recipe, str(r.batch_size), "-", "failed: " + r.error[:70], *[""] * (len(header) - 4)))
            continue
        row = (r.recipe, str(r.batch_size), str(r.steps), f"{r.final_acc:.4f}", f"{r.best_acc:.4f}",
               "-" if r.steps_to_target is None else str(r.steps_to_target),
               "-" if r.seconds_to_target is None else f"{r.seconds_to_target:.1f}",
               f"{r.seconds_per_step:.3f}", f"{r.peak_rss_mb:.0f}")
        if compared:
            # a difference of two accuracies: percentage points, not a percentage of anything
            gap = "baseline" if r is baseline else f"{100 * (r.final_acc - baseline.final_acc):+.1f}pp"
            row = (*row[:4], gap, *row[4:])
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_accuracy(results: Sequence[RunResult], target: float, title: str) -> Any:
    """Accuracy against optimizer steps and against training wall time, one line per run (a Figure)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r.recipe for r in results))}
    batches = sorted({r.batch_size for r in results}, reverse=True)
    styles = {b: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(batches)}
    for r in results:
        if r.history:
            steps, seconds, accs = zip(*r.history, strict=False)
            style = dict(marker="o", markersize=3, color=colors[r.recipe], linestyle=styles[r.batch_size],
                         label=f"{r.recipe} @ {r.batch_size}")
            axes[0].plot(steps, accs, **style)
            axes[1].plot(seconds, accs, **style)
    for ax, xlabel in zip(axes, ("optimizer step", "training wall time [s]"), strict=False):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.1%}")
        ax.set(xlabel=xlabel, xscale="log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))  # 20, 50, 100: not 2x10^1
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set(ylabel="validation accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_outputs(results: Sequence[RunResult], out_dir: Path, target: float, title: str = "lbo compare"
                  ) -> list[Path]:
    """``results.csv`` (one row per run), ``history.csv`` (one row per validation), ``accuracy.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.csv", out_dir / "history.csv"]
    fields = [k for k in RunResult.__dataclass_fields__ if k != "history"]
    with open(written[0], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({k: v for k, v in asdict(r).items() if k != "history"})
    with open(written[1], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["recipe", "batch_size", "step", "train_seconds", "val_acc"])
        for r in results:
            writer.writerows([r.recipe, r.batch_size, *rec] for rec in r.history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no accuracy.png (pip install matplotlib)", file=sys.stderr)
        return written
    fig = plot_accuracy(results, target, title)
    fig.savefig(out_dir / "accuracy.png", dpi=110)
    plt.close(fig)
    return [*written, out_dir / "accuracy.png"]


def plot_title(specs: Sequence[RunSpec], results: Sequence[RunResult]) -> str:
    """Model, data, batch sizes and epochs of a comparison, for the plot."""
    spec = specs[0]
    model = spec.module or {"cnn": "SmallCNN", "mlp-bn": "MLP-BN 256-128", "mlp": "MLP 256-128",
                            "resnet": "ResNet-20", "resnet8": "ResNet-8"}.get(spec.model, spec.model)
    images = max((r.train_examples for r in results), default=0)
    data = spec.datamodule or "Fashion-MNIST"
    data += f" ({images} training images)" if images else ""
    batches = ", ".join(str(b) for b in dict.fromkeys(s.batch_size for s in specs))
    epochs = ", ".join(str(e) for e in dict.fromkeys(s.epochs for s in specs))
    return f"{model} on {data}: batch {batches}, {epochs} epoch(s)"


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def compare(specs: Sequence[RunSpec], target: float, out_dir: Path | None, in_process: bool = False,
            baseline_batch: int = 0) -> list[RunResult]:
    """Run every spec (each in a child process unless ``in_process``), print the table, write outputs.

    A failed run becomes a row that says why; the other rows are still measured and printed. With
    ``baseline_batch``, the table compares every final accuracy with the ``sgd`` run at that batch.
    """
    results = []
    for spec in specs:
        print(f"== {spec.recipe} at global batch {spec.batch_size}, {spec.epochs} epoch(s)", flush=True)
        try:
            result = run_one(spec) if in_process else _run_in_child(spec)
        except Exception as err:  # the table still shows what was measured for the other runs
            message = str(err) if isinstance(err, RuntimeError) and not in_process else f"{type(err).__name__}: {err}"
            message = message or repr(err)
            result = RunResult(spec.recipe, spec.batch_size, 0, math.nan, math.nan, None, None, math.nan, math.nan,
                               error=message)
            print(f"   failed: {result.error}", file=sys.stderr, flush=True)
        result.steps_to_target, result.seconds_to_target = reach_target(result.history, target)
        results.append(result)
    if not _is_global_zero():
        return results
    baseline = next((r for r in results if r.recipe == "sgd" and r.batch_size == baseline_batch), None)
    print()
    print(format_table(results, target, baseline))
    for note in below_sgd_notes(results):
        print(note)
    never = [f"{r.recipe}@{r.batch_size}" for r in results if not r.error and r.steps_to_target is None]
    if never:
        print(f"target accuracy {target:.1%} was not reached by: {', '.join(never)} "
              "(raise --epochs or lower --target)")
    if out_dir is not None:
        for path in write_outputs(results, out_dir, target, plot_title(specs, results)):
            print(f"wrote {path}")
    return results


def _json_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}); e.g. '{{\"hidden\": 64}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object of keyword arguments, e.g. '{\"hidden\": 64}'")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (paragraphs), every option's default after its help."""


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train recipes side by side on Fashion-MNIST and print a table",
                       description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated, from: {', '.join(RECIPE_NAMES)}")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="global batch size of the recipes")
    p.add_argument("--baseline-batch-size", type=int, default=DEFAULT_BASELINE_BATCH,
                   help="also train the SGD recipe at this small batch (0: no baseline row)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help="epoch budget of every run (the recipes fit warmup and decay to it)")
    p.add_argument("--target", type=float, default=0.80, help="target validation accuracy of the 'steps to' columns")
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS, help="bundled data set")
    p.add_argument("--model", default="mlp-bn", choices=tuple(MODELS),
                   help="reference model: cnn (SmallCNN), mlp-bn / mlp (MLP 256-128 with / without BN), "
                        "resnet (ResNet-20), resnet8 (ResNet-8)")
    p.add_argument("--train-subset", type=int, default=0, help="use the first N training images (0: all 60000)")
    p.add_argument("--module", default=None, help="your LightningModule instead, as 'package.module:Class'")
    p.add_argument("--module-kwargs", type=_json_kwargs, default={}, help="JSON keyword arguments of --module")
    p.add_argument("--datamodule", default=None,
                   help="your LightningDataModule (takes batch_size, per device), as 'package.module:Class'")
    p.add_argument("--datamodule-kwargs", type=_json_kwargs, default={}, help="JSON keyword arguments of --datamodule")
    p.add_argument("--monitor", default="val_acc", help="validation accuracy the module logs")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: once per epoch)")
    p.add_argument("--devices", type=int, default=1, help="processes (CPU) or accelerators per node")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (under torchrun or SLURM)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy (auto: ddp_spawn when devices > 1)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto, ...")
    p.add_argument("--data-dir", default=None, help="where to look for Fashion-MNIST first (see lbo data)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch threads per training process (0: torch's default, one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--out-dir", default=None, help="where CSV and PNG go (None: lbo_runs/compare-<time>)")
    p.add_argument("--in-process", action="store_true", help="run every recipe in this process (debugging)")
    p.set_defaults(func=_cmd_compare)


def _validate(args: argparse.Namespace, names: list[str]) -> str | None:
    """An error message for bad arguments, or None."""
    from lightning_lbo.recipes import RECIPES

    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        return f"Unknown recipe(s): {', '.join(unknown) or repr(args.recipes)}. Available: {', '.join(RECIPES)}."
    if not 0.0 < args.target <= 1.0:
        return f"Invalid --target {args.target}: use an accuracy in (0, 1]."
    if args.epochs < 1 or args.batch_size < 1 or args.baseline_batch_size < 0:
        return "--epochs and --batch-size must be positive, --baseline-batch-size >= 0."
    if args.devices < 1 or args.num_nodes < 1 or args.threads < 0 or args.train_subset < 0:
        return "--devices and --num-nodes must be positive; --threads and --train-subset >= 0."
    for batch in (args.batch_size, args.baseline_batch_size):
        if batch and batch % (args.devices * args.num_nodes):
            return f"Batch size {batch} is not divisible by devices x nodes = {args.devices * args.num_nodes}."
    if not args.datamodule:
        images = min(args.train_subset or FASHION_MNIST_TRAIN, FASHION_MNIST_TRAIN)
        for flag, batch in (("--batch-size", args.batch_size), ("--baseline-batch-size", args.baseline_batch_size)):
            if batch > images:
                where = (f"--train-subset {args.train_subset}" if args.train_subset
                         else f"all {FASHION_MNIST_TRAIN} Fashion-MNIST images")
                return (f"{flag} {batch} is larger than the training set ({where}): lower the batch"
                        + (" or raise the subset (0: all 60000 images)." if args.train_subset else "."))
    try:
        if args.module:
            _check_lightning_class(import_object(args.module, "module"), "LightningModule", args.module)
        if args.datamodule:
            cls = import_object(args.datamodule, "datamodule")
            _check_lightning_class(cls, "LightningDataModule", args.datamodule)
            params = inspect.signature(cls).parameters
            if "batch_size" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return f"{args.datamodule} must take a batch_size argument (the per-device batch size)."
    except ValueError as err:
        return str(err)
    if not args.datamodule:
        from lightning_lbo.data import DataNotFoundError, locate_fashion_mnist

        try:
            locate_fashion_mnist(args.data_dir)
        except DataNotFoundError as err:
            return str(err)
    return None


def _cmd_compare(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    error = _validate(args, names)
    if error:
        print(error, file=sys.stderr)
        return 2
    common = dict(epochs=args.epochs, model=args.model, module=args.module, module_kwargs=args.module_kwargs,
                  datamodule=args.datamodule, datamodule_kwargs=args.datamodule_kwargs, monitor=args.monitor,
                  devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy, data_dir=args.data_dir,
                  train_subset=args.train_subset or None, eval_every=args.eval_every, seed=args.seed,
                  threads=args.threads, accelerator=args.accelerator)
    specs = [RunSpec("sgd", args.baseline_batch_size, **common)] if args.baseline_batch_size else []
    specs += [RunSpec(name, args.batch_size, **common) for name in names]
    out_dir = Path(args.out_dir or os.path.join("lbo_runs", time.strftime("compare-%Y%m%d-%H%M%S")))
    results = compare(specs, args.target, out_dir if _is_global_zero() else None, in_process=args.in_process,
                      baseline_batch=args.baseline_batch_size)
    return 0 if any(not r.error for r in results) else 1
