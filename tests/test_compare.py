"""`lbo compare`: runs on any LightningModule/DataModule, reports failures and unreached targets, validates input."""

from __future__ import annotations

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.cli import main
from lightning_lbo.compare import RunResult, RunSpec, _run_in_child, compare, format_table, reach_target, run_one


class TinyModule(pl.LightningModule):
    """A user's module: its own configure_optimizers must be replaced by the recipe's."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        raise AssertionError("lbo compare must use the recipe's optimizer")


class TinyData(pl.LightningDataModule):
    """3 linearly separable classes in 8 dimensions; takes the per-device batch size."""

    def __init__(self, batch_size: int, size: int = 256) -> None:
        super().__init__()
        self.batch_size, self.size = batch_size, size

    def setup(self, stage=None) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.size + 128, 8, generator=g)
        y = x[:, :3].argmax(1)
        self.train_set = TensorDataset(x[: self.size], y[: self.size])
        self.val_set = TensorDataset(x[self.size:], y[self.size:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=128)


def _spec(recipe: str = "sgd", batch: int = 64, epochs: int = 2, **kw) -> RunSpec:
    return RunSpec(recipe, batch, epochs, module="tests.test_compare:TinyModule", module_kwargs={"hidden": 16},
                   datamodule="tests.test_compare:TinyData", monitor="val_accuracy", eval_every=2, progress=False,
                   **kw)


def test_compare_user_module_table_csv_png_and_failures(tmp_path, capsys):
    """A user module trains with the recipe's optimizer; a failing run and an unreached target are reported."""
    specs = [_spec("kfac"), _spec("sgd", batch=100_000)]
    results = compare(specs, target=0.999, out_dir=tmp_path, in_process=True)
    ok, failed = results
    assert ok.error == "" and ok.steps == 8  # 256 / 64 = 4 steps per epoch, 2 epochs
    assert [r[0] for r in ok.history] == [2, 4, 6, 8]
    assert all(0.0 <= r[2] <= 1.0 for r in ok.history) and ok.final_acc == ok.history[-1][2]
    assert ok.seconds_per_step > 0 and ok.peak_rss_mb > 0
    assert "larger than 256 training examples" in failed.error
    out = capsys.readouterr().out
    assert "failed: ValueError: --batch-size 100000 is larger" in out
    assert "target accuracy 99.9% was not reached by: kfac@64" in out
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["recipe"] for r in rows] == ["kfac", "sgd"] and rows[1]["error"]
    history = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert len(history) == 4 and (tmp_path / "accuracy.png").stat().st_size > 0


def test_reach_target_first_crossing_and_table_dashes():
    """Steps/seconds to target come from the first validation at or above it; '-' when never reached."""
    history = [(2, 1.0, 0.5), (4, 2.0, 0.81), (6, 3.0, 0.79), (8, 4.0, 0.9)]
    assert reach_target(history, 0.8) == (4, 2.0)
    assert reach_target(history, 0.95) == (None, None)
    result = RunResult("sgd", 64, 8, 0.9, 0.9, None, None, 0.5, 100.0, history=history)
    line = format_table([result], 0.95).splitlines()[2].split()
    assert line[:5] == ["sgd", "64", "8", "0.9000", "0.9000"] and line[5:7] == ["-", "-"]


def test_compare_ddp_spawn_in_child_process():
    """--devices 2 --strategy ddp_spawn from the default child process: rank 0's measurements come back."""
    result = _run_in_child(_spec("sgd", batch=64, epochs=1, devices=2, strategy="ddp_spawn", threads=1))
    assert result.error == "" and result.steps == 4  # 128 examples per rank / 32 per device
    assert [r[0] for r in result.history] == [2, 4] and not math.isnan(result.final_acc)


@pytest.mark.parametrize("args, message", [
    (["--recipes", "sgd,adam"], "Unknown recipe(s): adam. Available: sgd, goyal"),
    (["--batch-size", "4096", "--train-subset", "1000"], "--batch-size 4096 is larger than the training set"),
    (["--module", "no_such_pkg.models:Net"], "Cannot import module 'no_such_pkg.models:Net'"),
    (["--module", "torch.nn:Linear"], "'torch.nn:Linear' is not a LightningModule subclass"),
    (["--module", "tests.test_compare:Missing"], "tests.test_compare has no 'Missing'"),
    (["--target", "90"], "Invalid --target 90.0: use an accuracy in (0, 1]"),
    (["--batch-size", "4095", "--devices", "2"], "Batch size 4095 is not divisible by devices x nodes = 2"),
])
def test_lbo_compare_rejects_bad_input(args, message, capsys):
    """Bad recipes, sizes and import paths fail before any training with a message naming the fix."""
    assert main(["compare", *args]) == 2
    assert message in capsys.readouterr().err


def test_lbo_compare_unknown_dataset_lists_choices(capsys):
    """An unknown --dataset is an argparse error listing the bundled data sets."""
    with pytest.raises(SystemExit):
        main(["compare", "--dataset", "cifar10"])
    assert "invalid choice: 'cifar10'" in capsys.readouterr().err


def test_run_one_fashion_mnist_reference_model():
    """The default path: the reference MLP-BN on a Fashion-MNIST subset learns above chance (0.1) in 4 steps."""
    result = run_one(RunSpec("kfac", 512, 1, model="mlp-bn", train_subset=2048, eval_every=4, progress=False))
    assert result.steps == 4 and result.final_acc > 0.2  # chance: 0.1
    assert result.paper_batch == (16384, 1281167, "ImageNet")  # for the notes, without rebuilding the recipe


def test_lbo_compare_start_up_imports_no_lightning():
    """The parent process (checks, table, notes) imports no Lightning package: only the training processes do."""
    import subprocess
    import sys

    code = ("import sys; from lightning_lbo.cli import main; rc = main(['compare', '--batch-size', '100000']); "
            "from lightning_lbo.compare import below_sgd_notes; import lightning_lbo.recipes; "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr


def test_lbo_compare_batch_larger_than_fashion_mnist_stops_before_training(tmp_path, capsys):
    """A batch above the 60000 training images fails up front with exit 2 (docs/compare.md), no run, no PNG."""
    out = tmp_path / "out"
    assert main(["compare", "--batch-size", "100000", "--out-dir", str(out)]) == 2
    err = capsys.readouterr()
    assert "--batch-size 100000 is larger than the training set (all 60000 Fashion-MNIST images)" in err.err
    assert "==" not in err.out and not out.exists()
    assert main(["compare", "--baseline-batch-size", "70000", "--out-dir", str(out)]) == 2
    assert "--baseline-batch-size 70000 is larger" in capsys.readouterr().err


def test_lbo_compare_help_paragraphs_whole_every_option_documented(capsys):
    """--help: no raw RST markup, no cut sentence, every option has a help text and shows its default."""
    import argparse

    from lightning_lbo.cli import build_parser

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text
    description = text.split("options:")[0].split("\n\n", 1)[1]
    first, *paragraphs = description.strip().split("\n\n")
    assert first.startswith("lbo compare: ") and first.endswith(".")
    for paragraph in paragraphs:  # a sentence cut at a paragraph break starts in lower case
        assert paragraph[0].isupper() and paragraph.rstrip().endswith("."), paragraph
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["compare"]._actions:
        if action.dest != "help":
            assert action.help, action.dest
    assert text.count("(default:") == len(sub.choices["compare"]._actions) - 1


def _result(recipe: str, batch: int, acc: float, steps: int = 42) -> RunResult:
    """A finished run of ``recipe`` with the paper batch its recipe states (``run_one`` records it so)."""
    from lightning_lbo.recipes import build_recipe

    return RunResult(recipe, batch, steps, acc, acc, None, None, 0.1, 100.0, history=[(steps, 1.0, acc)],
                     train_examples=60000, paper_batch=build_recipe(recipe, batch, 3, 14).paper_batch)


def test_below_sgd_notes_say_why_with_the_papers_batch_ratio():
    """Goyal below SGD at 4096: the batch is 10.7x beyond the ratio of Goyal's 8K ImageNet runs (~384 here)."""
    from lightning_lbo.compare import below_sgd_notes

    results = [_result("sgd", 4096, 0.85), _result("goyal", 4096, 0.80), _result("lars", 4096, 0.86),
               _result("sgd", 512, 0.88), _result("lars", 512, 0.87, steps=351)]
    goyal, lars = below_sgd_notes(results)
    assert goyal.startswith("goyal ends 5.0 pp below sgd at batch 4096: the batch is 6.83% of the 60000")
    assert "10.7x beyond" in goyal and "8192 of 1281167 ImageNet images = 0.64%, a batch of ~384 here" in goyal
    assert "linear scaling rule's LR overshoots" in goyal
    assert lars.startswith("lars ends 1.0 pp below sgd at batch 512") and "within the largest ratio" in lars
    assert below_sgd_notes([_result("goyal", 4096, 0.8)]) == []  # no sgd row: nothing to compare


def test_plot_names_model_data_batch_epochs_with_legends_and_plain_step_ticks():
    """The demo plot: a title naming model, data, batch and epochs; a legend on each panel; ticks like 20, 50."""
    import matplotlib

    matplotlib.use("Agg")
    from lightning_lbo.compare import plot_accuracy, plot_title

    results = [RunResult("sgd", 128, 1404, 0.88, 0.88, None, None, 0.01, 100.0, train_examples=60000,
                         history=[(351, 2.0, 0.84), (1404, 8.0, 0.88)]),
               RunResult("kfac", 4096, 42, 0.87, 0.87, None, None, 0.1, 100.0, train_examples=60000,
                         history=[(14, 1.0, 0.8), (42, 3.0, 0.87)])]
    specs = [RunSpec("sgd", 128, 3, model="mlp-bn"), RunSpec("kfac", 4096, 3, model="mlp-bn")]
    title = plot_title(specs, results)
    assert title == "MLP-BN 256-128 on Fashion-MNIST (60000 training images): batch 128, 4096, 3 epoch(s)"
    fig = plot_accuracy(results, 0.8, title)
    fig.canvas.draw()
    assert fig._suptitle.get_text() == title
    steps_axis, time_axis = fig.axes
    assert steps_axis.get_legend() is not None and time_axis.get_legend() is not None
    labels = [t.get_text() for t in steps_axis.get_xticklabels() if t.get_text()]
    assert "100" in labels and "1000" in labels and not any("^" in label for label in labels)


def test_table_compares_every_run_with_the_small_batch_baseline():
    """With a baseline, a 'vs sgd@256' column gives each final accuracy minus the baseline's; failed rows stay."""
    results = [_result("sgd", 256, 0.886), _result("sgd", 4096, 0.804), _result("kfac", 4096, 0.880),
               RunResult("lars", 4096, 0, math.nan, math.nan, None, None, math.nan, math.nan, error="boom")]
    lines = format_table(results, 0.8, baseline=results[0]).splitlines()
    assert lines[0].split()[:5] == ["recipe", "batch", "steps", "final", "acc"] and "vs sgd@256" in lines[0]
    assert [line.split()[4] for line in lines[2:5]] == ["baseline", "-8.2pp", "-0.6pp"]  # points, not a percentage
    assert lines[5].split()[:4] == ["lars", "4096", "-", "failed:"]
    assert "vs sgd" not in format_table(results, 0.8)  # no baseline run: no column


def test_docs_options_table_matches_the_parser():
    """docs/compare.md lists every `lbo compare` option with the parser's default (empty cell: None or {})."""
    import argparse
    import re
    from pathlib import Path

    from lightning_lbo.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = {a.option_strings[0]: a.default for a in sub.choices["compare"]._actions if a.dest != "help"}
    documented = {}
    docs = (Path(__file__).resolve().parent.parent / "docs" / "compare.md").read_text()
    for options, defaults in re.findall(r"^\| (`--[^|]+)\|([^|]*)\|", docs, flags=re.MULTILINE):
        names = [o.strip(" `") for o in options.split(",")]
        values = [v.strip(" `") for v in defaults.split(",")] if len(names) > 1 else [defaults.strip(" `")]
        documented.update(zip(names, values + [""] * (len(names) - len(values)), strict=True))
    assert set(documented) == set(parser)
    for name, default in parser.items():
        expected = {None: "", False: "off"}.get(default, default) if not isinstance(default, dict) else ""
        assert documented[name] == str(expected) or float(documented[name]) == default, (name, documented[name])
