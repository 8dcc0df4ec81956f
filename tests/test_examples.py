"""examples/: the LightningCLI script with per-recipe YAML configs, the two-callback script, launch scripts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# 2 epochs of 1 batch (64 images): 2 optimizer steps, enough for a 1-epoch warmup followed by a decay
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--data.batch_size", "64", "--data.train_subset", "64",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_has_a_config():
    """Each recipe of lightning_lbo.recipes ships a YAML config."""
    from lightning_lbo.recipes import RECIPES

    assert {p.stem for p in (EXAMPLES / "configs").glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name, optimizer, callbacks", [
    ("goyal", "SGD", {"LRSchedule", "ZeroGammaInit"}),
    ("kfac", "KFAC", {"LRSchedule", "KFACCallback"}),
])
def test_train_cli_config_runs_one_step(name, optimizer, callbacks, tmp_path):
    """`train_cli.py fit --config configs/<recipe>.yaml` builds optimizer and callbacks from YAML and trains 2 steps."""
    cli = _load("train_cli").main(["fit", "--config", str(EXAMPLES / "configs" / f"{name}.yaml"), *TINY,
                                   "--trainer.default_root_dir", str(tmp_path)])
    trainer = cli.trainer
    assert trainer.global_step == 2
    assert type(trainer.optimizers[0]).__name__ == optimizer
    assert callbacks <= {type(c).__name__ for c in trainer.callbacks}
    if name == "goyal":  # zero-gamma found the ResNet's residual blocks
        zero = next(c for c in trainer.callbacks if type(c).__name__ == "ZeroGammaInit")
        assert zero.zeroed == 9  # ResNet-20: 3 stages x 3 blocks


def test_train_cli_print_config_all_recipes(tmp_path):
    """Every YAML config parses and instantiates (optimizer factory, callbacks) without training."""
    module = _load("train_cli")
    for config in sorted((EXAMPLES / "configs").glob("*.yaml")):
        cli = module.main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
        assert callable(cli.model.optimizer_factory), config.name
        assert cli.trainer.callbacks, config.name


def test_two_callbacks_example_trains(capsys):
    """The plain two-callback example fits with LRSchedule and BatchNormStats."""
    trainer = _load("two_callbacks").main(["--epochs", "1", "--batch-size", "256", "--train-subset", "512"])
    assert trainer.global_step == 2
    assert "validation accuracy after 2 steps" in capsys.readouterr().out


def test_launch_scripts_are_valid_bash():
    """The torchrun and SLURM scripts parse (bash -n)."""
    for script in ("torchrun.sh", "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(EXAMPLES / "multinode" / script)]).returncode == 0


def test_wandb_example_offline(tmp_path):
    """The WandbLogger example logs a recipe offline."""
    pytest.importorskip("wandb", reason="wandb is optional (pip install lightning-lbo[wandb])")
    trainer = _load("wandb_logger").main(["--recipe", "sgd", "--epochs", "1", "--batch-size", "256",
                                          "--train-subset", "512", "--save-dir", str(tmp_path)])
    assert trainer.global_step == 2 and any(tmp_path.rglob("*.wandb"))


def test_wandb_example_without_wandb_says_how_to_install(capsys, monkeypatch):
    """Without wandb the example exits with the pip command instead of a traceback."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert _load("wandb_logger").main(["--epochs", "1"]) is None
    assert "pip install wandb" in capsys.readouterr().err
