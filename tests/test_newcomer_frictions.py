"""A newcomer's frictions (issue 26, item 12): messages that name the recommended API, docs that run, a light CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_lbo.callbacks import LRSchedule
from tests.conftest import make_trainer
from tests.test_adaptive_batch_size import tiny_classifier, tiny_loader

ROOT = Path(__file__).resolve().parent.parent


def test_lr_schedule_with_a_torch_scheduler_names_lightning_scheduler(pl_package, tmp_path):
    """LRSchedule next to a scheduler from configure_optimizers: the message names the documented
    ``schedules.lightning_scheduler`` (docs/schedules.md), not the lower-level ``lambda_lr``."""
    module = tiny_classifier(pl_package)

    def configure_optimizers():
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)}

    module.configure_optimizers = configure_optimizers
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, callbacks=[LRSchedule(log=False)])
    with pytest.raises(ValueError, match=r"lightning_lbo\.schedules\.lightning_scheduler\(optimizer, schedule\)"):
        trainer.fit(module, tiny_loader())


def _python_snippet(page: str, heading: str) -> str:
    """The first ```python block after ``heading`` in docs/``page``."""
    text = (ROOT / "docs" / page).read_text()
    return text.split(heading, 1)[1].split("```python", 1)[1].split("```", 1)[0]


def test_getting_started_recipe_snippet_runs(monkeypatch, tmp_path):
    """docs/getting_started.md's "Option 2" runs as written (it used a `dm` and a `Trainer` it never defined), cut to
    three steps of 256 on 512 images by a Trainer and data module that override only the run's length."""
    import pytorch_lightning as pl

    from lightning_lbo import data
    from lightning_lbo.data import DataNotFoundError, FashionMNISTDataModule, locate_fashion_mnist

    try:
        locate_fashion_mnist()
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST not found (make data)")

    class OneStep(pl.Trainer):
        def __init__(self, **kwargs):
            kwargs.update(max_steps=3, limit_val_batches=0, logger=False,  # a warmup that does not fit is shortened
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path)
            super().__init__(**kwargs)

    class FewImages(FashionMNISTDataModule):
        def __init__(self, batch_size, **kwargs):
            super().__init__(batch_size=min(batch_size, 256), train_subset=512, **kwargs)

    monkeypatch.setattr(pl, "Trainer", OneStep)
    monkeypatch.setattr(data, "FashionMNISTDataModule", FewImages)
    namespace: dict = {}
    exec(compile(_python_snippet("getting_started.md", "## Option 2"), "getting_started.md", "exec"), namespace)
    assert namespace["dm"].batch_size == 256 and isinstance(namespace["model"], pl.LightningModule)
    assert namespace["model"].trainer.global_step == 3


@pytest.mark.parametrize("command", ["compare", "advise"])
def test_cli_subcommand_help_imports_neither_torch_nor_lightning(command):
    """``lbo <command> --help`` in a fresh interpreter leaves torch and Lightning out of sys.modules (the help of
    ``compare`` imported torch through the recipes, ``advise`` Lightning through the advisor's callbacks)."""
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from lightning_lbo.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["{command}", "--help"])
            except SystemExit:
                pass
        assert "usage: lbo {command}" in out.getvalue(), out.getvalue()
        print(sorted(m for m in ("torch", "numpy", "pytorch_lightning", "lightning") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_compare_recipe_names_are_the_recipes():
    """The light list of recipe names the compare parser shows is exactly the registry's."""
    from lightning_lbo.compare import RECIPE_NAMES
    from lightning_lbo.recipes import RECIPES

    assert RECIPE_NAMES == tuple(RECIPES)


def test_advise_parser_keeps_its_choices_and_older_home():
    """The parser moved to lightning_lbo.advise_cli; the advisor still validates with the same choices."""
    from lightning_lbo import advise_cli, critical_batch

    assert critical_batch.add_advise_parser is advise_cli.add_advise_parser
    assert critical_batch.SCALINGS == ("linear", "sqrt") and set(critical_batch.MONITORS) == {"val_acc", "val_loss"}
