"""Batch size that grows by itself, measured on Fashion-MNIST (issue 16, goals 1-4).

Cells, each one training run cached as ``benchmarks/adaptive_batch_results/<model>/<cell>-s<seed>.json``
(a finished cell is never rerun, so the study resumes where it stopped; each run holds one slot of
the shared benchmark lock with one torch thread, :mod:`benchmarks.bench_lock`):

* ``fixed-B``: momentum SGD (Nesterov 0.9, wd 5e-4) at a fixed batch ``B``, LR ``0.1 x B / 128``
  (LRSchedule, linear rule, Goyal warmup over the first epoch for ``B > 128``), cosine decay to 0.
* ``noise``: starts at 128; ``NoiseScaleRule(margin=1)`` doubles the batch (resize mechanism) at an
  epoch end when ``B_simple`` (GradientNoiseScale, two-halves probe every 20 steps) exceeds it; the
  LR follows through LRSchedule (linear rule, 20-step re-warmup), the cosine clock counts examples.
* ``noise-steps``: ``noise`` deciding every 100 optimizer steps (``decide_every_n_steps``; the
  sampler resizes mid-epoch) instead of at epoch ends.
* ``abs``: ABS, ``HessianRule(ratio 0.5, duration 2)`` with gradient accumulation (as the paper).
* ``absa``: ``abs`` plus FGSM examples (ratio 0.2, eps 0.005, until half of training).
* ``abs-paper`` / ``absa-paper``: ABS / ABSA in the paper's proportions, fixed before any run (see
  ``PAPER_*`` below): the top eigenvalue 90 times per run (every 1/90 of the run's samples, as the
  paper's once per epoch of 90), ``duration`` 10 decisions, ratio 0.5, up to 128x the base batch,
  the LR x2 at each doubling at once (no re-warmup), gradient accumulation; the baseline's cosine
  schedule. Each decision's eigenvalue and what triggered each growth are in the run's ``history``.
* ``abs-capped`` / ``absa-capped``: exactly ``abs-paper`` / ``absa-paper`` except the maximum batch,
  which is the critical-batch advisor's recommended batch for the same model and seed (read from the
  cached ``advise-s<seed>.json``; the advisor sees validation data only). Pre-registered, written
  before any such run and not changed after: seeds 0-2, MLP-BN then SmallCNN; the paper's 128x cap
  was chosen for its problem, the package's advisor is the principled cap for a new one. Prediction
  from the duration trigger alone (doublings at decisions 10, 20, 30 of 90): MLP caps 512/1024 give
  at most 0.36x/0.28x fixed-128's steps, the accuracy near fixed-512/1024's (-0.0/-0.2 points), so
  goal 2 should hold; the CNN's cap of 256 (2x) gives at least 0.5x by construction, (10 + 80/2)/90
  = 0.56x with duration alone, so goal 2's step criterion cannot hold there whatever the accuracy.
* ``replay-noise`` / ``replay-abs``: ``RampRule`` replaying that seed's batch schedule without any
  measurement (the first session's overhead reading; ``--overhead`` below replaces it).
* ``advise``: the critical-batch advisor (:func:`lightning_lbo.critical_batch.advise`) at 128 until the
  ladder's validation target, recommending from ``B_simple`` over the last 100 steps before it.
* ``trace-128``: fixed-128 with ``B_simple`` measured all along (probe every 5 steps; run on request
  with ``--cells trace-128``): the noise scale near the target, against the ladder's knee.
* ``eigen-trace``: fixed-128 with the top Hessian eigenvalue measured at every epoch end as ABS does
  and against references (converged, other batches, a large batch, train-mode BN): goal 2's check.
* ``const-<B>-x<m>`` (run on request with ``--cells const``): goal 3's critical batch measured as
  McCandlish et al. (arXiv 1812.06162) do, with the LR tuned per batch and no schedule tied to the
  run's length. Protocol, fixed before any such run: batch ``B`` in ``CONST_BATCHES``, peak LR
  ``m x 0.1 x B / 128`` (the advisor's base LR, linear rule) for ``m`` in ``CONST_LR_MULTIPLIERS``
  (1 first, then 2, then 0.5: run in that order, the 0.5 points dropped first when compute runs
  out), skipped above ``CONST_LR_CAP`` (1.6: the largest peak LR the cosine ladder trained at without
  diverging on both models, fixed-2048); a linear warmup from 0 over ``CONST_WARMUP_STEPS`` (20)
  steps for every ``B``, then constant; momentum, weight decay, data, validation set, validation
  every quarter epoch (the same interval in examples as the ladder) and target as the ladder;
  training stops at the first validation reaching the target, within a budget of twice the ladder's
  epochs (else "not reached"). Per batch and seed, the fewest (interpolated) steps over the LRs run
  for every batch and seed; the knee (``KNEE_RATIO``) and the fit ``S = S_min (1 + B_crit / B)`` on
  their mean over seeds; the advisor's recommendation against that knee per seed.

``--overhead noise|abs`` (goal 4) times a rule against the replay of the same run's batch schedule in
alternating pairs under the exclusive lock; every rule cell also records the CPU time spent inside
its measurement (``measure_cpu_s``).

All runs: 55k training images (5k held out for validation every quarter epoch), test accuracy on the
official 10k, equal epochs. ``--report`` rewrites ``benchmarks/ADAPTIVE_BATCH.md`` and the plots from
whatever is cached, naming the missing cells.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 nice -n 5 python benchmarks/adaptive_batch.py \\
        --model mlp-bn --seeds 0 1 2
    python benchmarks/adaptive_batch.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "adaptive_batch_results"
BASE_BATCH, BASE_LR, MAX_FACTOR, REWARMUP = 128, 0.1, 16, 20
ADVISE_WINDOW = 100  # the advisor's estimate: the last 100 steps before the target (a quarter epoch at 128)
# The paper's ABS transferred by proportion (Yao et al. 2018, arXiv 1810.01021, with its code, HessianFlow's
# hessianflow/optimizer/absa.py and README): Cifar-10 for 90 epochs (LR x0.2 at epochs 30/60/80), the top
# eigenvalue once per epoch (10 power iterations, tol 1e-2), growth x2 when it halved or after `duration = 10`
# measurements without growth, `--large-ratio 128` (128 x the base batch of 128), the LR multiplied by each
# growth at once. Here: a decision every 1/90 of the run's samples, 10 of them per duration (10/90 of the run).
PAPER_EPOCHS, PAPER_DURATION, PAPER_MAX_FACTOR = 90, 10, 128
TRAIN_SIZE = 55000  # Fashion-MNIST's 60k less the 5k held out for validation
STEP_DECISIONS = 100  # noise-steps: decide every 100 optimizer steps (a quarter epoch at 128), not at epoch ends
FIXED = (128, 256, 512, 1024, 2048, 4096)
EPOCHS = {"mlp-bn": 5, "cnn": 3}
MODEL_SPECS = {"mlp-bn": ("mlp", {"batch_norm": True}), "cnn": ("cnn", {})}
TRAIN_SUBSET: int | None = None  # smoke tests only (--train-subset); the study uses all images
TARGETS = {"mlp-bn": 0.86, "cnn": 0.85}  # validation accuracy of the steps-to-target columns
CONST_BATCHES = (128, 256, 512, 1024, 2048)  # goal 3's constant-LR ladder (cells const-<B>-x<m>)
CONST_LR_MULTIPLIERS = (1.0, 2.0, 0.5)  # x the linear-rule LR, in the order run (0.5 dropped first)
CONST_LR_CAP, CONST_WARMUP_STEPS = 1.6, 20


def const_cells() -> list[str]:
    """The constant-LR ladder's cells in the order run: by LR multiplier, then batch; those over the cap left out."""
    return [f"const-{b}-x{m:g}" for m in CONST_LR_MULTIPLIERS for b in CONST_BATCHES
            if m * BASE_LR * b / BASE_BATCH <= CONST_LR_CAP]


def parse_const_cell(cell: str) -> tuple[int, float]:
    """``const-<B>-x<m>`` -> ``(B, m)``."""
    _, batch, mult = cell.split("-")
    if not mult.startswith("x"):
        raise ValueError(f"Invalid constant-LR cell {cell!r}; expected const-<batch>-x<multiplier>.")
    return int(batch), float(mult[1:])


def cell_order() -> list[str]:
    """Most informative first: the goals' runs, the advisor, the sweep's ends, then the rest."""
    return ["fixed-128", "noise", "noise-steps", "advise", "fixed-2048", "fixed-512", "abs", "replay-noise", "absa",
            "abs-paper", "absa-paper", "fixed-1024", "fixed-256", "fixed-4096", "replay-abs", "abs-capped",
            "absa-capped"]


def cell_path(model: str, cell: str, seed: int) -> Path:
    return RESULTS / model / f"{cell}-s{seed}.json"


def load(model: str, cell: str, seed: int) -> dict[str, Any] | None:
    path = cell_path(model, cell, seed)
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------- running
def datamodule(seed: int, resizable: bool):
    from lightning_lbo.batch_sampler import ResizableBatchSampler, ResizableDataLoader
    from lightning_lbo.data import FashionMNISTDataModule, collate_batch

    class BenchData(FashionMNISTDataModule):
        loader = None

        def train_dataloader(self):
            if not resizable:
                return super().train_dataloader()
            if self.loader is None:  # one loader: the resize mechanism keeps resizing the same sampler
                sampler = ResizableBatchSampler(len(self.train_set), self.batch_size, seed=self.seed)
                self.loader = ResizableDataLoader(self.train_set, sampler, collate_fn=collate_batch)
            return self.loader

    return BenchData(batch_size=BASE_BATCH, val_size=5000, eval_batch_size=2500, seed=seed,
                     train_subset=TRAIN_SUBSET)


def recorder():
    import pytorch_lightning as pl

    class Recorder(pl.Callback):
        """Global batch and LR every 10 steps, validation accuracy at every validation."""

        def __init__(self):
            self.trace, self.curve = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step % 10 == 0:
                lr = optimizer.param_groups[0]["lr"]
                batch = getattr(trainer.train_dataloader, "batch_size", None) or \
                    trainer.train_dataloader.batch_sampler.batch_size
                self.trace.append((trainer.global_step, trainer.current_epoch, batch * trainer.accumulate_grad_batches,
                                   float(lr)))

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
                self.curve.append((trainer.global_step, trainer.current_epoch,
                                   float(trainer.callback_metrics["val_acc"])))

    return Recorder()


def eigen_trace(seed: int):
    """Goal 2's check: the top Hessian eigenvalue along a fixed-128 run (ABS's phase before its first growth).

    At the start and at every epoch end, measured as ABS does (the first training batch, eval-mode BN,
    10 power iterations, tolerance 1e-2) and, to see how far that is from the quantity it stands
    for: the same batch converged (200 iterations, 1e-4), four other random batches of 128 (the
    spread a different batch would give; HessianFlow draws a fresh batch each epoch), one random
    batch of 2048, and the same batch with batch-norm in training mode (the function SGD differentiates).
    """
    import pytorch_lightning as pl

    from lightning_lbo.hessian import HessianOperator, power_iteration

    class EigenTrace(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.fixed = None

        def measure(self, module, batch, iters, tol, bn_mode="eval"):
            op = HessianOperator(module, [batch], bn_mode=bn_mode)
            result = power_iteration(op, k=1, max_iters=iters, tol=tol, seed=0)
            op.release()
            return result.eigenvalues[0], result.num_hvps

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.fixed is None:
                self.fixed = tuple(t.detach().clone() for t in batch)
                self.record(trainer, pl_module, -1)  # at initialisation, on the batch ABS will keep

        def on_train_epoch_end(self, trainer, pl_module):
            self.record(trainer, pl_module, trainer.current_epoch)

        def record(self, trainer, pl_module, epoch):
            data = trainer.datamodule.train_set
            gen = torch.Generator().manual_seed(1000 * seed + epoch + 1)
            perm = torch.randperm(len(data), generator=gen)
            was_training = pl_module.training
            start = time.perf_counter()
            abs_value, abs_hvps = self.measure(pl_module, self.fixed, 10, 1e-2)
            abs_s = time.perf_counter() - start
            row = {"epoch": epoch, "step": trainer.global_step, "abs": abs_value, "abs_hvps": abs_hvps,
                   "abs_s": abs_s, "converged": self.measure(pl_module, self.fixed, 200, 1e-4)[0],
                   "random_128": [self.measure(pl_module, data.__getitems__(perm[i * 128:(i + 1) * 128].tolist()),
                                               100, 1e-3)[0] for i in range(4)],
                   "random_2048": self.measure(pl_module, data.__getitems__(perm[512:2560].tolist()), 100,
                                               1e-3)[0],
                   "train_bn": self.measure(pl_module, self.fixed, 100, 1e-3, bn_mode="train")[0]}
            pl_module.train(was_training)
            self.rows.append(row)
            print(f"eigen epoch {epoch}: abs {row['abs']:.2f} ({abs_hvps} HVPs, {abs_s:.2f} s), converged "
                  f"{row['converged']:.2f}, random 128 {[round(x, 2) for x in row['random_128']]}, "
                  f"2048 {row['random_2048']:.2f}", flush=True)

    return EigenTrace()


class HookClock:
    """CPU and wall seconds spent inside chosen methods of chosen objects (the rules' measurements).

    Timing the measurement inside the run itself attributes its cost without a second run, so the
    share does not depend on how the machine's load differed between two runs.
    """

    def __init__(self) -> None:
        self.cpu_s = self.wall_s = 0.0
        self.calls = 0

    def wrap(self, obj: Any, names: tuple[str, ...]) -> None:
        for name in names:
            method = getattr(obj, name)

            def timed(*args, _method=method, **kwargs):
                cpu, wall = time.process_time(), time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.cpu_s += time.process_time() - cpu
                    self.wall_s += time.perf_counter() - wall
                    self.calls += 1

            setattr(obj, name, timed)


def advised_factor(model: str, seed: int) -> int:
    """The ``-capped`` cells' maximum factor: the cached advisor's recommended batch over the base batch."""
    advice = load(model, "advise", seed)
    if advice is None:
        raise RuntimeError(f"{model} seed {seed}: the -capped cells take their cap from the advisor, which is not "
                           f"cached yet; run `--model {model} --seeds {seed} --cells advise` first.")
    return max(1, advice["recommended_batch"] // BASE_BATCH)


def run_cell(model: str, cell: str, seed: int, epochs: int, replay_history: list | None = None) -> dict[str, Any]:
    import pytorch_lightning as pl

    from lightning_lbo.batch_rules import HessianRule, NoiseScaleRule, RampRule
    from lightning_lbo.callbacks import AdaptiveBatchSize, AdversarialTraining, GradientNoiseScale, LRSchedule
    from lightning_lbo.classifier import ClassifierModule, sgd_factory
    from lightning_lbo.critical_batch import NoiseScaleTrace, StopAtTarget

    if cell == "advise":
        from lightning_lbo.critical_batch import advise

        start = time.perf_counter()  # to the ladder's target, within the ladder's epochs at 128
        advice = advise(model, BASE_BATCH, BASE_LR, steps=EPOCHS[model] * (TRAIN_SIZE // BASE_BATCH), seed=seed,
                        target=TARGETS[model], window=ADVISE_WINDOW, val_every_n_steps=50, train_subset=TRAIN_SUBSET)
        return {"b_simple": advice.b_simple, "recommended_batch": advice.recommended_batch,
                "recommended_lr": advice.recommended_lr, "steps": advice.steps, "window_start": advice.window_start,
                "target_step": advice.target_step, "validation": advice.validation, "history": advice.history,
                "wall_s": time.perf_counter() - start}
    batch, resizable, callbacks = BASE_BATCH, False, []
    eigen = eigen_trace(seed) if cell == "eigen-trace" else None
    if eigen is not None:
        callbacks.append(eigen)
    if cell == "trace-128":  # fixed-128 with B_simple measured all along (goal 3: the noise scale near the target)
        callbacks.append(GradientNoiseScale(beta=0.9, probe_every_n_steps=5, log_every_n_steps=5))
        callbacks.append(NoiseScaleTrace(callbacks[-1]))
    if cell.startswith("fixed-"):
        batch = int(cell.split("-")[1])
    elif cell in ("noise", "noise-steps", "replay-noise"):
        resizable = True
    rule = mechanism = None
    decide_every = STEP_DECISIONS if cell == "noise-steps" else None
    max_factor, rewarmup, every_samples = MAX_FACTOR, REWARMUP, None
    if cell in ("noise", "noise-steps"):
        rule, mechanism = NoiseScaleRule(margin=1.0), "resize"
        callbacks.append(GradientNoiseScale(beta=0.9, probe_every_n_steps=20, log_every_n_steps=20))
    elif cell in ("abs", "absa"):
        rule, mechanism = HessianRule(eigenvalue_ratio=0.5, duration=2), "accumulate"
    elif cell in ("abs-paper", "absa-paper", "abs-capped", "absa-capped"):
        rule, mechanism = HessianRule(eigenvalue_ratio=0.5, duration=PAPER_DURATION), "accumulate"
        max_factor = advised_factor(model, seed) if cell.endswith("-capped") else PAPER_MAX_FACTOR
        rewarmup = 0
        train_size = TRAIN_SIZE if TRAIN_SUBSET is None else TRAIN_SUBSET - 5000  # the 5k validation images
        every_samples = round(epochs * train_size / PAPER_EPOCHS)
    elif cell.startswith("replay-"):
        source = {"history": replay_history} if replay_history is not None else load(model, cell.split("-", 1)[1], seed)
        if source is None:
            raise RuntimeError(f"{cell} replays the schedule of {cell.split('-', 1)[1]}, which is not cached yet.")
        factors = {0: 1}
        for row in source["history"]:
            factors[row["epoch"] + 1] = row["next_factor"]
        rule, mechanism = RampRule(factors), ("resize" if cell == "replay-noise" else "accumulate")
    k, base_lr = batch / BASE_BATCH, BASE_LR
    if cell.startswith("const-"):  # goal 3 as McCandlish: constant LR after a 20-step ramp, stop at the target
        batch, mult = parse_const_cell(cell)
        base_lr, epochs = mult * BASE_LR, 2 * epochs
        schedule = LRSchedule(reference_batch_size=BASE_BATCH, scaling="linear", decay="constant", log=False,
                              warmup_steps=CONST_WARMUP_STEPS, warmup_start_factor=0.0)
        callbacks.append(StopAtTarget(TARGETS[model], "val_acc"))
    else:
        schedule = LRSchedule(reference_batch_size=BASE_BATCH, scaling="linear", decay="cosine", log=False,
                              **({"warmup_epochs": 1} if k > 1 else {}))
    callbacks.insert(0, schedule)
    if rule is not None:
        callbacks.append(AdaptiveBatchSize(rule=rule, mechanism=mechanism, max_factor=max_factor,
                                           rewarmup_steps=rewarmup, decide_every_n_steps=decide_every,
                                           decide_every_n_samples=every_samples))
    if cell in ("absa", "absa-paper", "absa-capped"):
        callbacks.append(AdversarialTraining(ratio=0.2, epsilon=0.005, stop_fraction=0.5))
    clock = HookClock()  # what the rule's measurement costs: the noise callback's hooks, the Hessian's
    for cb in callbacks:
        if isinstance(cb, GradientNoiseScale):
            clock.wrap(cb, ("on_train_batch_start", "on_before_optimizer_step"))
        elif isinstance(cb, AdaptiveBatchSize) and rule is not None and rule.needs is not None:
            clock.wrap(cb, ("measure",))
            if rule.needs == "eigenvalue":
                clock.wrap(cb.fixed, ("offer",))
    rec = recorder()
    callbacks.append(rec)
    pl.seed_everything(seed, verbose=False)
    name, kwargs = MODEL_SPECS[model]
    module = ClassifierModule(name, optimizer=sgd_factory(lr=base_lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
                              model_kwargs=kwargs)
    dm = datamodule(seed, resizable)
    dm.batch_size = batch
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=0.25, callbacks=callbacks,
                         reload_dataloaders_every_n_epochs=1 if resizable else 0)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=dm)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    test_acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"]
    abs_cb = next((cb for cb in callbacks if isinstance(cb, AdaptiveBatchSize)), None)
    gns = next((cb for cb in callbacks if isinstance(cb, GradientNoiseScale)), None)
    return {"steps": trainer.global_step, "test_acc": test_acc, "wall_s": wall, "cpu_s": cpu, "curve": rec.curve,
            "trace": rec.trace, "history": abs_cb.history if abs_cb else [],
            "b_simple": gns.history if gns else [],
            "noise_trace": next((cb.rows for cb in callbacks if isinstance(cb, NoiseScaleTrace)), []),
            "measure_cpu_s": clock.cpu_s, "measure_wall_s": clock.wall_s,
            **({"eigen": eigen.rows} if eigen else {})}


def run(models: list[str], seeds: list[int], cells: list[str] | None, threads: int) -> None:
    from benchmarks.bench_lock import bench_lock

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for seed in seeds:
        for model in models:
            expanded = [c for name in cells for c in (const_cells() if name == "const" else [name])] if cells else None
            for cell in expanded or cell_order():
                if cell_path(model, cell, seed).exists():
                    continue
                # A one-thread run takes one of the two slots; more threads take the machine.
                with bench_lock(exclusive=threads > 1):
                    load_before = os.getloadavg()[0]
                    result = run_cell(model, cell, seed, EPOCHS[model])
                    load_after = os.getloadavg()[0]
                save(model, cell, seed, threads, result, load_before, load_after)


def overhead(model: str, seed: int, rule: str, pairs: int) -> None:
    """Goal 4: time of ``rule`` vs the replay of its batch schedule, alternating, on a machine kept for it.

    Each pair runs both cells with one thread under the exclusive lock (no other benchmark runs
    meanwhile; unlocked work, such as other agents' tests, may); the order alternates between pairs
    so that a drift in the load does not favour one side. Wall and process CPU time are recorded:
    with one thread the CPU time is the work itself, much less sensitive to what else runs. Appends
    to ``overhead-<rule>-s<seed>.json``.
    """
    from benchmarks.bench_lock import bench_lock

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    path = RESULTS / model / f"overhead-{rule}-s{seed}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    # The replays follow the batch schedule of this study's first rule run (with one thread it can differ from
    # the cached cell's), so both sides of every pair train the same steps at the same batch sizes.
    schedule = next((r["history"] for r in rows if r["cell"] == rule), None)
    for pair in range(len({r["pair"] for r in rows}), len({r["pair"] for r in rows}) + pairs):
        order = (rule, f"replay-{rule}") if schedule is None or pair % 2 == 0 else (f"replay-{rule}", rule)
        with bench_lock(exclusive=True):
            for cell in order:
                load_before = os.getloadavg()[0]
                result = run_cell(model, cell, seed, EPOCHS[model], replay_history=schedule)
                if cell == rule and schedule is None:
                    schedule = result["history"]
                rows.append({"pair": pair, "cell": cell, "wall_s": result["wall_s"], "cpu_s": result["cpu_s"],
                             "steps": result["steps"], "history": result["history"], "load_before": load_before,
                             "load_after": os.getloadavg()[0]})
                print(f"overhead {model} {cell} pair {pair}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s "
                      f"CPU, {result['steps']} steps, load {load_before:.1f}", flush=True)
        path.write_text(json.dumps(rows, indent=1))


def save(model: str, cell: str, seed: int, threads: int, result: dict[str, Any], load_before: float,
         load_after: float) -> None:
    path = cell_path(model, cell, seed)
    result.update(model=model, cell=cell, seed=seed, epochs=EPOCHS[model], threads=threads,
                  load_before=load_before, load_after=load_after, torch=torch.__version__,
                  allocator=f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}",
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    print(f"{model} {cell} seed {seed}: {result.get('steps')} steps, test acc "
          f"{result.get('test_acc', float('nan')):.4f}, {result['wall_s']:.0f} s", flush=True)

# ---------------------------------------------------------------------------------------------- report
def steps_to(curve: list, target: float) -> int | None:
    return next((step for step, _, acc in curve if acc >= target), None)


def steps_to_interpolated(curve: list, target: float) -> float | None:
    """Optimizer steps at which validation accuracy first reaches ``target``, linear between validations.

    Validations come every quarter epoch, so the plain first-crossing step is quantised to 107
    steps at batch 128 but 13 at 1024; interpolating between the two validations around the
    crossing removes most of that bias.
    """
    prev = (0, 0.0)
    for step, _, acc in curve:
        if acc >= target:
            s0, a0 = prev
            return s0 + (target - a0) / (acc - a0) * (step - s0) if acc > a0 else float(step)
        prev = (step, acc)
    return None


KNEE_RATIO = 0.75  # S(2B) / S(B) above this: doubling no longer (nearly) halves steps


def doubling_table(model: str, seeds: list[int]) -> tuple[list[tuple[int, float, float, float | None]], int | None]:
    """Goal 3's empirical critical batch, read directly off the fixed-batch ladder.

    Rows ``(B, mean interpolated steps-to-target, their sd over seeds, S(2B) / S(B))``. A doubling
    "halves" the steps when ``S(2B) / S(B) <= KNEE_RATIO`` (0.75: halfway between perfect scaling,
    0.5, and none, 1.0; the fit ``S = S_min (1 + B_crit / B)`` gives 0.75 exactly at ``B = B_crit``).
    The knee is the smallest ``B`` from which no further doubling on the ladder halves the steps (so
    a single noisy ratio in the middle of the ladder does not set it); None if the last doubling
    still halves them.
    """
    target, means = TARGETS[model], {}
    for b in FIXED:
        runs = [load(model, f"fixed-{b}", s) for s in seeds]
        reached = [steps_to_interpolated(r["curve"], target) for r in runs if r]
        if reached and all(x is not None for x in reached):
            means[b] = (statistics.mean(reached), statistics.stdev(reached) if len(reached) > 1 else 0.0)
        elif reached:  # run, but the target was never reached: no doubling into this batch halves anything
            means[b] = (math.inf, 0.0)
    return ladder_knee(means)


def ladder_knee(means: dict[int, tuple[float, float]]
                ) -> tuple[list[tuple[int, float, float, float | None]], int | None]:
    """Rows ``(B, mean steps, sd, S(2B) / S(B))`` and the knee of a ladder ``{B: (mean steps, sd)}``.

    ``math.inf`` steps stand for "target not reached"; a doubling from such a batch halves nothing
    (ratio ``math.inf``, not ``inf / inf``). The knee is the smallest ``B`` from which no doubling on
    the ladder cuts the steps to ``KNEE_RATIO`` or less; None if the last one still does.
    """
    rows = [(b, mean, sd, (means[2 * b][0] / mean if math.isfinite(mean) else math.inf) if 2 * b in means else None)
            for b, (mean, sd) in means.items()]
    ratios = [(b, r) for b, _, _, r in rows if r is not None]
    knee = None
    for b, _ in ratios:
        if all(r > KNEE_RATIO for b2, r in ratios if b2 >= b):
            knee = b
            break
    return rows, knee


def best_over_lr(steps_by_lr: dict[float, float | None]) -> tuple[float, float | None]:
    """McCandlish's per-batch tuning: the fewest steps to the target over an LR grid, and that LR.

    ``None`` steps mean "not reached"; ``(math.inf, None)`` when no LR reached the target. Ties go
    to the smaller LR.
    """
    reached = [(steps, lr) for lr, steps in sorted(steps_by_lr.items()) if steps is not None]
    return min(reached, key=lambda x: x[0]) if reached else (math.inf, None)


def const_ladder(model: str, seeds: list[int]) -> tuple[dict[int, dict[int, tuple[float, float | None]]], list[float]]:
    """Goal 3 at constant LR: ``{B: {seed: (fewest interpolated steps to the target, its peak LR)}}``.

    Only the LR multipliers run for every batch and seed (under the cap) enter the minimum, so that
    every batch is tuned over the same grid; returns them too. Empty if some batch has no run.
    """
    cells = set(const_cells())
    complete = [m for m in CONST_LR_MULTIPLIERS
                if all(load(model, f"const-{b}-x{m:g}", s) for b in CONST_BATCHES for s in seeds
                       if f"const-{b}-x{m:g}" in cells)]
    if not complete:
        return {}, []
    table: dict[int, dict[int, tuple[float, float | None]]] = {}
    for b in CONST_BATCHES:
        for s in seeds:
            grid = {m * BASE_LR * b / BASE_BATCH: steps_to_interpolated(r["curve"], TARGETS[model])
                    for m in complete if (r := load(model, f"const-{b}-x{m:g}", s))}
            table.setdefault(b, {})[s] = best_over_lr(grid)
    return table, complete


def overhead_lines(model: str, seeds: list[int]) -> list[str]:
    """Goal 4: the interleaved timings of ``--overhead`` (rule / replay per pair)."""
    lines = []
    for rule in ("noise", "abs"):
        for seed in seeds:
            path = RESULTS / model / f"overhead-{rule}-s{seed}.json"
            if not path.exists():
                continue
            rows = json.loads(path.read_text())
            ratios, cpu_ratios, loads = [], [], []
            for pair in sorted({r["pair"] for r in rows}):
                runs = {r["cell"]: r for r in rows if r["pair"] == pair}
                if rule in runs and f"replay-{rule}" in runs:
                    ratios.append(runs[rule]["wall_s"] / runs[f"replay-{rule}"]["wall_s"])
                    cpu_ratios.append(runs[rule]["cpu_s"] / runs[f"replay-{rule}"]["cpu_s"])
                loads += [r["load_before"] for r in runs.values()]
            runs_txt = "; ".join(f"{r['cell']} {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU ({r['steps']} steps)"
                                 for r in rows)
            lines.append(f"- overhead of the {rule} rule, seed {seed}, {len(ratios)} alternating pairs under the "
                         f"exclusive lock, 1 thread: CPU-time ratios {', '.join(f'{x:.3f}' for x in cpu_ratios)}, "
                         f"wall ratios {', '.join(f'{x:.3f}' for x in ratios)}"
                         + (f" (medians {statistics.median(cpu_ratios):.3f} CPU, {statistics.median(ratios):.3f} wall)"
                            if ratios else "")
                         + f"; load average {min(loads):.1f}-{max(loads):.1f}; runs: {runs_txt}")
    return lines


def paper_lines(model: str, seeds: list[int]) -> list[str]:
    """Goal 2 in the paper's proportions: per run, the decisions, each growth and its trigger, the closest halving."""
    lines = []
    for cell in ("abs-paper", "absa-paper", "abs-capped", "absa-capped"):
        for seed in seeds:
            r = load(model, cell, seed)
            if not r:
                continue
            reference, ratios, growths = None, [], []
            for h in r["history"]:
                if reference is None:
                    reference = h["measurement"]
                    continue
                ratios.append(h["measurement"] / reference)
                if h.get("trigger"):
                    growths.append(f"step {h['step']} (epoch {h['epoch']}): {h['measurement']:.1f} vs reference "
                                   f"{reference:.1f}, {h['trigger']}, x{h['next_factor']}")
                    reference = h["measurement"]
            values = [h["measurement"] for h in r["history"]]
            triggers = [h["trigger"] for h in r["history"] if h.get("trigger")]
            if not lines:
                lines += ["", "ABS in the paper's proportions (`-capped`: capped at the advisor's recommended batch): "
                          "every growth, what triggered it (the eigenvalue at half its reference, or `duration` "
                          "decisions without growth), and the lowest ratio of an eigenvalue to its reference (0.5 "
                          "would trigger):", ""]
            largest = BASE_BATCH * max(h["next_factor"] for h in r["history"])
            cap = f" (cap {BASE_BATCH * advised_factor(model, seed)})" if cell.endswith("-capped") else ""
            lines.append(f"- {cell}, seed {seed}: {len(values)} decisions, largest batch {largest}{cap}, eigenvalue "
                         f"{values[0]:.1f} first, "
                         f"{min(values):.1f}-{max(values):.1f}, {values[-1]:.1f} last; growths: "
                         f"{triggers.count('eigenvalue')} by the eigenvalue, {triggers.count('duration')} by duration; "
                         f"lowest ratio to the reference {min(ratios):.2f}; " + "; ".join(growths))
    return lines


def eigen_lines(model: str, seeds: list[int]) -> list[str]:
    """Goal 2's check: the eigenvalue trace of the ``eigen-trace`` cell."""
    lines = []
    for seed in seeds:
        r = load(model, "eigen-trace", seed)
        if not r:
            continue
        lines += ["", f"Top Hessian eigenvalue along fixed-128, seed {seed} (cell `eigen-trace`; epoch -1 = at "
                  "initialisation):", "",
                  "| epoch | step | as ABS measures it (10 it., tol 1e-2) | same batch, converged | "
                  "4 other batches of 128: mean (min-max) | a batch of 2048 | same batch, train-mode BN | "
                  "ABS HVPs, s |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["eigen"]:
            rnd = row["random_128"]
            lines.append(f"| {row['epoch']} | {row['step']} | {row['abs']:.2f} | {row['converged']:.2f} | "
                         f"{statistics.mean(rnd):.2f} ({min(rnd):.2f}-{max(rnd):.2f}) | {row['random_2048']:.2f} | "
                         f"{row['train_bn']:.2f} | {row['abs_hvps']}, {row['abs_s']:.2f} |")
    return lines


def const_lines(model: str, seeds: list[int]) -> list[str]:
    """Goal 3 at constant LR (cells ``const-*``): the per-batch table, its knee and fit, the advisor against it."""
    table, grid = const_ladder(model, seeds)
    if not table:
        runs = sum(1 for c in const_cells() for s in seeds if load(model, c, s))
        return [f"- constant-LR ladder: {runs}/{len(const_cells()) * len(seeds)} runs cached, no complete LR grid yet"
                ] if runs else []
    means = {}
    for b, per_seed in table.items():
        values = [v[0] for v in per_seed.values()]
        means[b] = ((statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
                    if all(math.isfinite(v) for v in values) else (math.inf, 0.0))
    rows, knee = ladder_knee(means)
    reached = {b: m for b, (m, _) in means.items() if math.isfinite(m)}
    b_crit = fit_b_crit(reached)
    run_cells = [c for c in const_cells() if parse_const_cell(c)[1] in grid]
    loads = [r["load_before"] for c in run_cells for s in seeds if (r := load(model, c, s))]
    walls = [r["wall_s"] for c in run_cells for s in seeds if (r := load(model, c, s))]
    threads = sorted({r["threads"] for c in run_cells for s in seeds if (r := load(model, c, s))})
    dropped = [f"x{m:g}" for m in CONST_LR_MULTIPLIERS if m not in grid]
    lines = ["", f"Goal 3 at constant LR (cells `const-<B>-x<m>`, McCandlish's protocol in the script's docstring): "
             f"LR grid {', '.join(f'x{m:g}' for m in grid)} of 0.1 x B / 128, capped at {CONST_LR_CAP:g}"
             + (f" ({', '.join(dropped)} not run for every batch and seed: out of compute)" if dropped else "")
             + f", {CONST_WARMUP_STEPS}-step warmup then constant, stop at the first validation reaching "
             f"{TARGETS[model]:.0%}, budget {2 * EPOCHS[model]} epochs; {len(walls)} runs, torch threads {threads}, "
             f"{sum(walls):.0f} s wall in all, load average {min(loads):.1f}-{max(loads):.1f}. Steps to the target "
             "(interpolated between validations), the fewest over the LR grid, and that LR:", "",
             "| batch | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | S(2B)/S(B) |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    for b, mean, sd, ratio in rows:
        cells = [f"{v:.0f} (LR {lr:g})" if lr is not None else "not reached"
                 for v, lr in (table[b][s] for s in seeds)]
        lines.append(f"| {b} | " + " | ".join(cells) + " | "
                     + (f"{mean:.0f} ± {sd:.0f}" if math.isfinite(mean) else "not reached") + " | "
                     + ("-" if ratio is None else f"{ratio:.2f}" if math.isfinite(ratio) else "2B not reached") + " |")
    lines += ["", f"- constant-LR knee (x{KNEE_RATIO} rule on the mean of the per-seed minima): {knee or 'none'}"
              + (f"; fit S = S_min (1 + B_crit / B) on the reached batches: B_crit = {b_crit:.0f}" if b_crit else
                 f"; no fit S = S_min (1 + B_crit / B): {len(reached)} batches reached on every seed (3 needed)"
                 if len(reached) < 3 else "; the fit S = S_min (1 + B_crit / B) has no positive B_crit")]
    outside = [(c, s, r) for c in const_cells() if parse_const_cell(c)[1] not in grid for s in seeds
               if (r := load(model, c, s))]
    if outside:
        reached = [(c, s, r, steps_to_interpolated(r["curve"], TARGETS[model])) for c, s, r in outside]
        lines.append("- runs outside that grid (an LR not run for every batch and seed; not in the minima): "
                     + "; ".join(f"{c} seed {s}: " + (f"{v:.0f} steps" if v is not None else
                                                      f"not reached in {r['steps']} steps") for c, s, r, v in reached))
    advice = [r for r in (load(model, "advise", s) for s in seeds) if r]
    if advice and knee:
        lines.append("- advisor against the constant-LR knee: " + ", ".join(
            f"seed {r['seed']}: {r['recommended_batch']} / {knee} = {r['recommended_batch'] / knee:.2f}"
            for r in advice) + " (goal: within a factor of 2, 0.5-2.0)"
            + ("; against its B_crit: " + ", ".join(f"{r['recommended_batch'] / b_crit:.2f}" for r in advice)
               if b_crit else ""))
    return lines


def advisor_lines(model: str, seeds: list[int], knee: int | None, b_crit: float | None) -> list[str]:
    """Goal 3: the advisor's recommendation against the knee, and ``B_simple`` along fixed-128 near the target."""
    from lightning_lbo.critical_batch import window_b_simple

    lines, target = [], TARGETS[model]
    runs = [r for r in (load(model, "advise", s) for s in seeds) if r]
    if runs:
        recs = [r["recommended_batch"] for r in runs]
        estimates = ", ".join(f"{r['b_simple']:.0f}" for r in runs)
        lines.append(f"- advisor (batch 128, LR 0.1 until {target:.0%} validation accuracy, B_simple over the last "
                     f"{ADVISE_WINDOW} steps), seeds {[r['seed'] for r in runs]}: target reached at step "
                     f"{[r.get('target_step') for r in runs]}, B_simple {estimates}, recommended batch {recs}"
                     + (f"; ratio to the knee {', '.join(f'{b / knee:.2f}' for b in recs)}" if knee else "")
                     + (f"; ratio to the fit's B_crit {', '.join(f'{b / b_crit:.2f}' for b in recs)}"
                        if b_crit else ""))
    for seed in seeds:
        r = load(model, "trace-128", seed)
        if not r or not r.get("noise_trace"):
            continue
        rows, reached = [tuple(x) for x in r["noise_trace"]], steps_to_interpolated(r["curve"], target)
        marks = rows[:: max(1, len(rows) // 8)] + rows[-1:]
        near = (f"over the {ADVISE_WINDOW} steps before the target (step {reached:.0f}): "
                f"{window_b_simple([x for x in rows if x[0] <= reached], ADVISE_WINDOW)[0]:.0f}"
                if reached is not None else "target not reached")
        lines.append(f"- B_simple along fixed-128 with the cosine schedule (cell trace-128, seed {seed}, EMA estimate "
                     f"at step: value): {', '.join(f'{x[0]}: {x[2]:.0f}' for x in dict.fromkeys(marks))}; {near}"
                     + (f"; the knee: {knee}" if knee else ""))
    img = ROOT.parent / "docs" / "img" / f"adaptive_batch_b_simple_{model}.png"
    if plot_b_simple_traces(model, seeds, knee, img):
        lines += ["", f"![B_simple over training](../docs/img/{img.name})", ""]
    return lines


def plot_b_simple_traces(model: str, seeds: list[int], knee: int | None, path: Path) -> bool:
    """Goal 3's plot: B_simple (EMA) over training in the advisor's runs and along fixed-128, against the knee."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(cell, s, load(model, cell, s)) for cell in ("advise", "trace-128") for s in seeds]
    runs = [(cell, s, r) for cell, s, r in runs
            if r and (r.get("history") if cell == "advise" else r.get("noise_trace"))]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for cell, seed, r in runs:
        rows = r["history"] if cell == "advise" else r["noise_trace"]
        style = "-" if cell == "advise" else "--"
        line, = ax.plot([x[0] for x in rows], [max(x[2], 1.0) for x in rows], style, lw=0.9,
                        label=f"{'advisor (LR 0.1)' if cell == 'advise' else 'fixed-128 (cosine)'}, seed {seed}")
        reached = r.get("target_step") if cell == "advise" else steps_to_interpolated(r["curve"], TARGETS[model])
        if reached is not None:
            ax.axvline(reached, color=line.get_color(), lw=0.6, ls=":")
    if knee:
        ax.axhline(knee, color="k", lw=1.0, label=f"ladder knee {knee}")
    ax.set_yscale("log", base=2)
    ax.set_ylim(16, 8192)
    ax.set_xlabel("optimizer step at batch 128 (dotted: the run reaches the target)")
    ax.set_ylabel("B_simple")
    ax.set_title(f"Fashion-MNIST {model}: gradient noise scale over training, target {TARGETS[model]:.0%} val. acc.")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def critical_batch(model: str, seeds: list[int]) -> tuple[dict[int, float], float | None]:
    """Mean steps-to-target per fixed batch and ``B_crit`` of the fit ``S = S_min (1 + B_crit / B)``."""
    target, steps = TARGETS[model], {}
    for b in FIXED:
        runs = [load(model, f"fixed-{b}", s) for s in seeds]
        reached = [steps_to(r["curve"], target) for r in runs if r]
        if reached and all(x is not None for x in reached):
            steps[b] = statistics.mean(reached)
    return steps, fit_b_crit(steps)


def fit_b_crit(steps: dict[int, float]) -> float | None:
    """``B_crit`` of the least-squares fit ``S = S_min + S_min B_crit / B`` (linear in ``1 / B``); None if it fails.

    Needs three batches or more; a fit with a non-positive slope or intercept (no diminishing
    return, or none at all) has no critical batch.
    """
    if len(steps) < 3:
        return None
    xs, ys = [1 / b for b in steps], list(steps.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    return slope / intercept if intercept > 0 and slope > 0 else None


def summarize(model: str, cell: str, seeds: list[int]) -> dict[str, Any] | None:
    runs = [r for r in (load(model, cell, s) for s in seeds) if r]
    if not runs:
        return None

    def stat(key):
        values = [r[key] for r in runs]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    out = {"n": len(runs), "seeds": [r["seed"] for r in runs], "wall": stat("wall_s"),
           "load": statistics.mean(r["load_before"] for r in runs), "threads": sorted({r["threads"] for r in runs})}
    if cell == "advise":
        out.update(b_simple=stat("b_simple"), recommended=[r["recommended_batch"] for r in runs])
    else:
        out.update(steps=stat("steps"), acc=stat("test_acc"),
                   final_batch=[r["trace"][-1][2] if r["history"] and r["trace"] else None for r in runs])
    return out


def plot_run(model: str, seed: int, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {c: load(model, c, seed) for c in ("fixed-128", "noise", "noise-steps", "abs", "abs-paper")}
    runs = {c: r for c, r in runs.items() if r}
    if len(runs) < 2:
        return False
    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    for cell, r in runs.items():
        x = [t[0] for t in r["trace"]]  # optimizer step, shared with the accuracy panel
        batch = [(t[0], t[2]) for t in r["trace"]]
        if cell.endswith("-paper"):  # a few large steps at the end: the 10-step trace misses them, the decisions don't
            batch = [(h["step"], BASE_BATCH * h["factor"]) for h in r["history"]] + \
                [(r["steps"], BASE_BATCH * r["history"][-1]["next_factor"])]
        axes[0].plot([b[0] for b in batch], [b[1] for b in batch], label=cell)
        axes[1].plot(x, [t[3] for t in r["trace"]], label=cell)
        axes[2].plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], label=f"{cell} ({r['steps']} steps)")
    axes[0].set_yscale("log", base=2)
    axes[0].set_ylabel("global batch")
    axes[1].set_ylabel("LR")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("validation accuracy")
    axes[2].set_ylim(0.75, 0.92)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST {model}, seed {seed}: batch size, LR and accuracy over a run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


PAPER_NOTE = [
    "## The paper's ABS configuration and its transfer (cells `abs-paper`, `absa-paper`)", "",
    "Yao, Gholami, Keutzer, Mahoney, arXiv 1810.01021. The search tool holds only the paper's abstract pages "
    "(ar5iv, groundai, openreview: the abstract and introduction), so its algorithm box and tables could not be read "
    "here; the numbers below are those of the authors' code, HessianFlow (amirgholami/HessianFlow; "
    "`hessianflow/optimizer/absa.py` read in IBM/model-sanitization's copy, `README.md` in the original), and of "
    "`shared/REFERENCE.md` section 5:", "",
    "| | paper / HessianFlow | where | `abs-paper` here |", "|---|---|---|---|",
    "| training length | 90 epochs (Cifar-10; LR x0.2 at epochs 30, 60, 80) | README: `--lr-decay-epoch 30 60 80` for "
    "ResNet, `--epochs 90` for the c1 example | 5 epochs (MLP-BN), 3 (SmallCNN), cosine decay as fixed-128 |",
    "| eigenvalue frequency | once per epoch: 90 per run | absa.py: `get_eigen` after every epoch | every 1/90 of the "
    "run's samples: 3056 (MLP), 1833 (CNN), i.e. 23.9 / 14.3 base batches |",
    "| power iteration | 10 iterations, tol 1e-2, one batch of 128, eval-mode BN | absa.py `get_eigen(..., maxIter=10, "
    "tol=1e-2)`; REFERENCE.md 5 | same (a fixed batch; HessianFlow draws a fresh one each epoch) |",
    "| growth | x2 when the eigenvalue is at most half the one at the last growth | absa.py `decay_ratio = 2`, "
    "`eig <= max_eig/decay_ratio` | `HessianRule(eigenvalue_ratio=0.5)` |",
    "| duration | 10 measurements without growth (10/90 of training) | absa.py `duration = 10`, `cur_duration` counted "
    "per measurement | 10 decisions (10/90 of the run) |",
    "| maximum batch | 128 x 128 = 16384 | README: `--large-ratio 128` | `max_factor=128` (16384) |",
    "| LR rule | LR x growth at once, on top of the baseline's schedule | absa.py `exp_lr_scheduler(optimizer, "
    "decay_ratio=large_ratio/prev_ratio)` | linear rule through LRSchedule, `rewarmup_steps=0` |",
    "| mechanism | gradient accumulation (BN sees 128) | absa.py: loss / `large_ratio`, step every `large_ratio` "
    "batches | `mechanism=\"accumulate\"`; a growth waits for an aligned window |",
    "| ABSA | 20% FGSM, eps 0.005, ratio halved per growth, off at the maximum batch and from half of training | "
    "train.py `adv_ratio=0.2, eps=0.005`; absa.py `adv_ratio /= decay_ratio`, `epoch >= epochs // 2` | "
    "`AdversarialTraining(0.2, 0.005, stop_fraction=0.5)` (counted in batches) |", "",
    "With duration alone, the paper's schedule doubles at epochs 10, 20, ..., 70 and trains 20 epochs at 16384: "
    "(10 (1 + 1/2 + ... + 1/64) + 20/128) / 90 = 0.22 of the baseline's steps, 4.5x fewer, before any eigenvalue "
    "trigger: the reach of the paper's '3-5x fewer iterations' comes from its proportions. This configuration was "
    "fixed from these numbers before any `abs-paper` run; nothing was tuned to the test set. A step holding more "
    "samples than the interval decides once (from 32x the base batch on the MLP, 16x on the CNN), so the runs take "
    "55-70 decisions rather than 90 and a `duration` there spans more data than 10/90 of the run.", ""]


def report(models: list[str], seeds: list[int]) -> None:
    lines = ["# Adaptive batch size: measured (issue 16)", "",
             "Generated by `python benchmarks/adaptive_batch.py --report` from the cache in "
             "`benchmarks/adaptive_batch_results/` (one JSON per run; see the script's docstring for the cells).",
             ""]
    lines += PAPER_NOTE + [""]
    for model in models:
        lines += [f"## {model}, {EPOCHS[model]} epochs, seeds {seeds}", ""]
        rows, missing = {}, []
        for cell in cell_order():
            summary = summarize(model, cell, seeds)
            if summary is None or summary["n"] < len(seeds):
                missing.append(f"{cell} ({0 if summary is None else summary['n']}/{len(seeds)} seeds)")
            if summary is not None:
                rows[cell] = summary
        if not rows:
            lines += ["No cell finished yet.", ""]
            continue
        lines += ["| run | seeds | optimizer steps | test accuracy | wall s | load avg | threads | last batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for cell, s in rows.items():
            if cell == "advise":
                continue
            final = ", ".join(str(b) for b in s["final_batch"] if b) or "-"
            lines.append(f"| {cell} | {s['n']} | {s['steps'][0]:.0f} ± {s['steps'][1]:.0f} | "
                         f"{s['acc'][0]:.4f} ± {s['acc'][1]:.4f} | {s['wall'][0]:.0f} | {s['load']:.1f} | "
                         f"{', '.join(map(str, s['threads']))} | {final} |")
        lines.append("")
        base = rows.get("fixed-128")
        goals = []
        if base:
            for cell, limit in (("noise", 0.4), ("noise-steps", 0.4), ("abs", 0.5), ("abs-paper", 0.5),
                                ("absa-paper", 0.5), ("abs-capped", 0.5), ("absa-capped", 0.5)):
                if cell in rows:
                    common = sorted(set(rows[cell]["seeds"]) & set(base["seeds"]))  # the same seeds on both sides
                    if not common:
                        continue
                    r, paired = summarize(model, cell, common), summarize(model, "fixed-128", common)
                    ratio = r["steps"][0] / paired["steps"][0]
                    drop = paired["acc"][0] - r["acc"][0]
                    goals.append(f"- {cell}: {ratio:.2f}x the steps of fixed-128, accuracy {-drop * 100:+.2f} points "
                                 f"on seeds {r['seeds']} (goal: <= {limit}x, >= "
                                 f"{-0.3 if cell.startswith('noise') else -0.5} points)")
            for absa, abs_ in (("absa", "abs"), ("absa-paper", "abs-paper"), ("absa-capped", "abs-capped")):
                both = absa in rows and abs_ in rows
                common = sorted(set(rows[absa]["seeds"]) & set(rows[abs_]["seeds"])) if both else []
                if common:
                    diff = summarize(model, absa, common)["acc"][0] - summarize(model, abs_, common)["acc"][0]
                    goals.append(f"- {absa} vs {abs_}: accuracy {diff * 100:+.2f} points on seeds {common}")
        for cell in ("noise", "abs"):
            if cell in rows and f"replay-{cell}" in rows:
                pairs = [(load(model, cell, s), load(model, f"replay-{cell}", s)) for s in seeds]
                ratios = [a["wall_s"] / b["wall_s"] for a, b in pairs if a and b]
                goals.append(f"- wall {cell} / replay-{cell} of the study cells (run apart, under varying load; not "
                             f"the overhead measurement): {', '.join(f'{x:.3f}' for x in ratios)}")
        goals += overhead_lines(model, seeds)
        for cell in ("noise", "noise-steps", "abs", "absa", "abs-paper", "absa-paper", "abs-capped", "absa-capped"):
            timed = [r for r in (load(model, cell, s) for s in seeds) if r and "measure_cpu_s" in r]
            if timed:
                shares = [r["measure_cpu_s"] / (r["cpu_s"] - r["measure_cpu_s"]) for r in timed]
                goals.append(f"- {cell}: CPU time inside the rule's measurement, timed within the run, relative to the "
                             f"rest of the run: {', '.join(f'{x:.1%}' for x in shares)} (seeds "
                             f"{', '.join(str(r['seed']) for r in timed)})")
        steps, b_crit = critical_batch(model, seeds)
        if steps:
            goals.append(f"- steps to {TARGETS[model]:.0%} validation accuracy (mean over seeds): "
                         + ", ".join(f"{b}: {s:.0f}" for b, s in steps.items())
                         + (f"; fit S = S_min (1 + B_crit / B): B_crit = {b_crit:.0f}" if b_crit else ""))
        table, knee = doubling_table(model, seeds)
        if table:
            goals.append(f"- steps to {TARGETS[model]:.0%} validation accuracy, interpolated between validations "
                         "(mean ± sd over seeds; S(2B)/S(B) = 0.5 is perfect scaling): "
                         + ", ".join((f"{b}: {m:.0f} ± {sd:.0f}" if math.isfinite(m) else f"{b}: not reached")
                                     + (f" (x{r:.2f} at 2B)" if r is not None and math.isfinite(r) else "")
                                     for b, m, sd, r in table)
                         + (f"; knee (smallest B from which no doubling cuts steps to x{KNEE_RATIO} or less): "
                            f"{knee}" if knee else ""))
        goals += advisor_lines(model, seeds, knee, b_crit)
        goals += const_lines(model, seeds)
        lines += (["Goals:", ""] + (goals or ["- nothing to compare yet"]) + paper_lines(model, seeds)
                  + eigen_lines(model, seeds) + [""])
        if missing:
            lines += ["Missing cells: " + ", ".join(missing), ""]
        img = ROOT.parent / "docs" / "img" / f"adaptive_batch_{model}.png"
        if plot_run(model, seeds[0], img):
            lines += [f"![run](../docs/img/{img.name})", ""]
    any_run = next((json.loads(p.read_text()) for p in sorted(RESULTS.rglob("*.json"))), None)
    if any_run:
        lines += [f"Machine: {any_run['machine']}, shared with other agents (load average per run in the table), "
                  f"torch threads per run in the table, {any_run['allocator']}, torch {any_run['torch']}.", ""]
    (ROOT / "ADAPTIVE_BATCH.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp-bn"], choices=tuple(MODEL_SPECS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=None, help=f"subset of {cell_order()}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: one lock slot)")
    parser.add_argument("--overhead", choices=("noise", "abs"), default=None,
                        help="time this rule against the replay of its schedule (exclusive lock, alternating pairs)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs of --overhead runs")
    parser.add_argument("--report", action="store_true", help="write the report from the cache only")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs (smoke tests)")
    parser.add_argument("--train-subset", type=int, default=None, help="first N images (smoke tests)")
    parser.add_argument("--results", default=None, help="cache directory (default: adaptive_batch_results)")
    args = parser.parse_args()
    global RESULTS, TRAIN_SUBSET
    if args.results:
        RESULTS = Path(args.results)
    TRAIN_SUBSET = args.train_subset
    if args.epochs:
        EPOCHS.update(dict.fromkeys(EPOCHS, args.epochs))
    if args.report:
        report(args.model, args.seeds)
    elif args.overhead:
        for model in args.model:
            overhead(model, args.seeds[0], args.overhead, args.pairs)
    else:
        run(args.model, args.seeds, args.cells, args.threads)


if __name__ == "__main__":
    main()
