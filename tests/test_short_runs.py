"""Short runs (fast_dev_run, a small max_steps) work with every shipped config; LRSchedule says what it shortened."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_lbo.callbacks import LRSchedule
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import callback_bases, lightning_package
from lightning_lbo.data import fashion_mnist_datamodule_class

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
# 4 training batches of 64 images per epoch, small validation batches.
TINY_DATA = ["--data.batch_size", "64", "--data.train_subset", "256", "--data.eval_batch_size", "64",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
NO_LOGGER = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0"]


def _train_cli():
    spec = importlib.util.spec_from_file_location("examples_train_cli", EXAMPLES / "train_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_trains_a_fast_dev_run(config, tmp_path, monkeypatch):
    """`train_cli.py fit --config <recipe>.yaml --trainer.fast_dev_run 2` (its docstring's command) trains 2 steps.

    The recipes behind the configs also train a max_steps-cut run: test_every_recipe_trains_a_short_run.
    """
    monkeypatch.chdir(tmp_path)
    cli = _train_cli().main(["fit", "--config", str(config), *TINY_DATA, "--trainer.fast_dev_run", "2"])
    assert cli.trainer.global_step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # fast_dev_run logs and saves nothing


def test_train_cli_without_logger_writes_nothing_here(tmp_path, monkeypatch):
    """`--trainer.logger false` with a max_steps-cut run: no stray config.yaml in the working directory."""
    monkeypatch.chdir(tmp_path)
    cli = _train_cli().main(["fit", "--config", str(EXAMPLES / "configs" / "sgd.yaml"), *TINY_DATA,
                             "--trainer.max_steps", "3", *NO_LOGGER])
    assert cli.trainer.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_cli_saves_the_config_beside_the_logs(tmp_path):
    """With a logger, the merged config lands in the logger's version directory."""
    cli = _train_cli().main(["fit", "--config", str(EXAMPLES / "configs" / "sgd.yaml"), *TINY_DATA,
                             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                             "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert [p.parent for p in tmp_path.rglob("config.yaml")] == [Path(cli.trainer.log_dir)]


class LRRecorder(*callback_bases()):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit_short(tmp_path, schedule: LRSchedule, **trainer_kwargs) -> list[float]:
    pl = lightning_package("pytorch_lightning")
    module = classifier_module_class()("mlp", optimizer=sgd_factory(lr=0.1, momentum=0.0, weight_decay=0.0),
                                       model_kwargs={"hidden": (8,)})
    recorder = LRRecorder()
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[schedule, recorder], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, datamodule=fashion_mnist_datamodule_class()(batch_size=64, train_subset=256))
    return recorder.lrs


@pytest.mark.parametrize("decay, trainer_kwargs, reason, expected", [
    # fast_dev_run=2: 2 steps; the 1-epoch warmup (2 steps) shrinks to 1, cosine decays over 1 step
    ("cosine", dict(fast_dev_run=2), "fast_dev_run leaves 2", [0.0, 0.1]),
    # max_steps=3 below 5 epochs of 4 steps: the 4-step warmup shrinks to 1, poly(2) decays over 2
    ("poly", dict(max_epochs=5, max_steps=3), r"max_steps=3 \(below max_epochs=5\) leaves 3", [0.0, 0.1, 0.025]),
])
def test_lr_schedule_shrinks_a_warmup_that_does_not_fit_a_cut_short_run(tmp_path, decay, trainer_kwargs, reason,
                                                                        expected):
    """A run cut short by the Trainer warms up over half of it, with a warning that says so."""
    schedule = LRSchedule(warmup_epochs=1, warmup_start_factor=0.0, decay=decay, log=False)
    with pytest.warns(UserWarning, match=f"{reason} optimizer steps, too few for the .*-step warmup and a {decay} "
                                         "decay; this run warms up over 1 steps instead"):
        lrs = _fit_short(tmp_path, schedule, **trainer_kwargs)
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_lr_schedule_warmup_longer_than_a_max_steps_run_is_still_an_error(tmp_path):
    """A run whose length is max_steps alone is not cut short: a warmup longer than it is a configuration error."""
    with pytest.raises(ValueError, match="longer than training"):
        _fit_short(tmp_path, LRSchedule(warmup_steps=5, warmup_start_factor=0.0), max_steps=3)


@pytest.mark.parametrize("trainer_kwargs, steps", [(dict(fast_dev_run=2), 2), (dict(max_epochs=10, max_steps=3), 3)],
                         ids=["fast_dev_run", "max_steps"])
def test_every_recipe_trains_a_short_run(tmp_path, trainer_kwargs, steps):
    """Each recipe of lightning_lbo.recipes, fitted to 10 epochs of 4 steps, trains a run cut to 2-3 steps."""
    from lightning_lbo.recipes import RECIPES, build_recipe

    pl = lightning_package("pytorch_lightning")
    datamodule = fashion_mnist_datamodule_class()(batch_size=64, train_subset=256, eval_batch_size=64)
    for name in RECIPES:
        recipe = build_recipe(name, global_batch_size=64, epochs=10, steps_per_epoch=4)
        module = classifier_module_class()("mlp", optimizer=recipe.optimizer,
                                           model_kwargs={"hidden": (16,), "batch_norm": True})
        trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=list(recipe.callbacks), logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=1, **trainer_kwargs)
        trainer.fit(module, datamodule=datamodule)
        assert trainer.global_step == steps, name
