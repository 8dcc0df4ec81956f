"""Log the Hessian's top eigenvalues, trace and eigenvalue density during training.

The pure computations live in :mod:`lightning_lbo.hessian`; this callback decides when (every
``every_n_epochs`` epochs, at ``on_train_epoch_end``: outside validation's ``no_grad``/inference mode)
and on what (fixed batches: the first ``num_batches`` training batches this process sees, cloned),
and logs through ``pl_module.log`` and the Trainer's loggers. Under DDP each rank contributes its own
fixed batches and the Hessian-vector products are all-reduced, so every rank logs the same values. Under
``fully_shard`` (``ModelParallelStrategy``) the full parameters are gathered on every rank for the duration
of a measurement (:func:`lightning_lbo._dtensor.fsdp_unsharded`); ``FSDPStrategy`` (FSDP1) is refused at setup.

Contract with the LightningModule (the default ``loss_fn``): a batch is ``(x, y)``, ``module(x)``
returns logits, ``module.loss_fn(logits, y)`` the mean loss (cross-entropy if it has no ``loss_fn``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_lbo._dtensor import fsdp_unsharded
from lightning_lbo.callbacks._sharded import parameter_sharding
from lightning_lbo.compat import callback_bases, callback_state_key, lightning_package, map_tensors, package_of
from lightning_lbo.hessian import (
    HessianOperator,
    HVPBudgetExceeded,
    SpectralDensity,
    classifier_loss,
    hutchinson_trace,
    parameters_of,
    slq_density,
    top_eigenvalues,
)
from lightning_lbo.hessian.hvp import BN_MODES, LossFn

ParamSelector = Callable[[nn.Module], Iterable[torch.Tensor]]
#: Why FSDP1 is refused (shared with AdaptiveBatchSize's Hessian rule); FSDP2 (fully_shard) works.
FSDP1_HVP_MESSAGE = ("{what} does not support FSDPStrategy (FSDP1 flat parameters): Hessian-vector products "
                     "differentiate the loss twice with respect to the parameters, which FSDP1 keeps in flat shards. "
                     "Instead, use ModelParallelStrategy with fully_shard (the full parameters are gathered for the "
                     "measurement) or strategy='ddp'.")


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class FixedBatches:
    """The first ``num_batches`` batches offered, detached copies (the fixed data of curvature estimates)."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.batches: list[Any] = []

    @property
    def ready(self) -> bool:
        return len(self.batches) >= self.num_batches

    def offer(self, batch: Any) -> None:
        if not self.ready:
            self.batches.append(map_tensors(lambda t: t.detach().clone(), batch))

    def to_state(self) -> list[Any]:
        return [map_tensors(lambda t: t.cpu(), b) for b in self.batches]

    def load(self, batches: list[Any], device: torch.device) -> None:
        self.batches = [map_tensors(lambda t: t.to(device), b) for b in batches]


def density_figure(density: SpectralDensity, title: str) -> Any:
    """A matplotlib figure of the smoothed density (log scale, as in PyHessian's plots)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = density.grid(400)
    phi = density.evaluate(grid).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(grid.numpy(), phi.numpy())
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_figure(trainer: Any, key: str, fig: Any, step: int, filename: str) -> list[str]:
    """Send ``fig`` to every logger that takes images; write a PNG when none does. Returns PNG paths written."""
    pkg = lightning_package(package_of(trainer))
    written, shown = [], False
    for logger in trainer.loggers:
        wandb_cls = getattr(pkg.loggers, "WandbLogger", ())
        if isinstance(logger, wandb_cls):
            import wandb

            logger.experiment.log({key: wandb.Image(fig), "trainer/global_step": step})
            shown = True
        elif isinstance(logger, pkg.loggers.TensorBoardLogger):
            logger.experiment.add_figure(key, fig, global_step=step)
            shown = True
    if not shown:
        log_dir = next((lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None)
        directory = os.path.join(log_dir or trainer.default_root_dir, "hessian")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, filename)
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


class HessianSpectrum(*callback_bases()):
    """Every ``every_n_epochs`` epochs: top-k eigenvalues, trace and density of the loss Hessian.

    Logged keys (``<g>`` is the parameter group name; the group ``"all"`` has no suffix):
    ``hessian/eig_<i>[/<g>]``, ``hessian/trace[/<g>]``, plus a density plot ``hessian/density[/<g>]``.

    Args:
        every_n_epochs: compute after every n-th training epoch.
        top_k: number of top eigenvalues (0: none).
        method: ``"lanczos"`` (default; all top-k from one Krylov run) or ``"power"`` (iteration with deflation).
        max_iters: HVPs per eigenvalue run at most (power: per eigenpair; Lanczos: in total).
        tol: relative tolerance of the eigenvalues and of the trace's standard error.
        trace_samples: Hutchinson probes at most (0: no trace).
        density_probes: SLQ probes (0: no density).
        density_steps: Lanczos steps per SLQ probe.
        num_batches: fixed training batches per process the Hessian is taken over.
        bn_mode: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics; buffers restored).
        param_groups: ``{name: selector}``; a selector maps the module to the parameters of a layer or block
            (e.g. ``lambda m: parameters_of(m.model.layer1)``). Default: ``{"all": all trainable parameters}``.
        loss_fn: ``loss_fn(module, batch) -> mean loss`` (default: the ``(x, y)`` / ``loss_fn`` contract).
        max_hvps: HVP budget per group and call (None: unlimited). Quantities left without budget are not logged.
        plot: send a density plot to the loggers (TensorBoard/W&B) or write a PNG; needs matplotlib.
        seed: seed of the probe vectors (the same probes every call).

    Example::

        trainer = Trainer(callbacks=[HessianSpectrum(every_n_epochs=5, top_k=3, trace_samples=50)])
    """

    def __init__(self, every_n_epochs: int = 1, top_k: int = 1, method: str = "lanczos", max_iters: int = 20,
                 tol: float = 1e-3, trace_samples: int = 20, density_probes: int = 1, density_steps: int = 40,
                 num_batches: int = 1, bn_mode: str = "eval", param_groups: dict[str, ParamSelector] | None = None,
                 loss_fn: LossFn = classifier_loss, max_hvps: int | None = None, plot: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("top_k", top_k, 0),
                                 ("max_iters", max_iters, 1), ("trace_samples", trace_samples, 0),
                                 ("density_probes", density_probes, 0), ("density_steps", density_steps, 1),
                                 ("num_batches", num_batches, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Invalid {name}: {value!r}; use an integer >= {low}.")
        if method not in ("power", "lanczos"):
            raise ValueError(f"Invalid method: {method!r}. Supported: ('power', 'lanczos').")
        if method == "lanczos" and top_k > max_iters:
            raise ValueError(f"top_k={top_k} eigenvalues need at least {top_k} Lanczos steps, but "
                             f"max_iters={max_iters}: raise max_iters (about 2 x top_k for converged values) "
                             "or lower top_k.")
        if bn_mode not in BN_MODES:
            raise ValueError(f"Invalid bn_mode: {bn_mode!r}. Supported: {BN_MODES}.")
        if not tol > 0:
            raise ValueError(f"Invalid tol: {tol}; use a positive float.")
        if max_hvps is not None and max_hvps < 1:
            raise ValueError(f"Invalid max_hvps: {max_hvps}; use a positive integer or None.")
        if plot and density_probes and not _matplotlib_available():
            raise ModuleNotFoundError("HessianSpectrum plots the density with matplotlib, which is not installed: "
                                      "`pip install matplotlib`, or pass plot=False (or density_probes=0).")
        self.every_n_epochs, self.top_k, self.method = every_n_epochs, top_k, method
        self.max_iters, self.tol, self.trace_samples = max_iters, tol, trace_samples
        self.density_probes, self.density_steps, self.bn_mode = density_probes, density_steps, bn_mode
        self.param_groups = dict(param_groups) if param_groups else {"all": parameters_of}
        self.loss_fn, self.max_hvps, self.plot, self.seed = loss_fn, max_hvps, plot, seed
        self.fixed = FixedBatches(num_batches)
        self.last: dict[str, dict[str, Any]] = {}
        self.png_paths: list[str] = []
        self._warned_short: set[str] = set()  # groups that gave fewer than top_k eigenvalues

    @property
    def state_key(self) -> str:
        return callback_state_key(self, every_n_epochs=self.every_n_epochs, groups=tuple(self.param_groups))

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and parameter_sharding(trainer) == "FSDPStrategy":
            raise ValueError(FSDP1_HVP_MESSAGE.format(what="HessianSpectrum"))

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.fixed.offer(batch)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or not self.fixed.ready:
            return
        for name, select in self.param_groups.items():
            suffix = "" if name == "all" else f"/{name}"
            with fsdp_unsharded(pl_module):  # fully_shard: the full parameters, for autograd to reach (collective)
                params = list(select(pl_module))
                result = self.compute(pl_module, params)
            self.last[name] = result
            found = len(result.get("eigenvalues", []))
            if self.top_k and found < self.top_k and name not in self._warned_short:
                self._warned_short.add(name)
                rank_zero_warn(f"HessianSpectrum: {found} of top_k={self.top_k} eigenvalues of group {name!r} were "
                               f"found and are logged: the group has {sum(p.numel() for p in params)} parameters, "
                               f"the HVP budget (max_hvps={self.max_hvps}) allowed {result['num_hvps']} products.")
            for i, value in enumerate(result.get("eigenvalues", [])):
                pl_module.log(f"hessian/eig_{i}{suffix}", value, on_epoch=True)
            if "trace" in result:
                pl_module.log(f"hessian/trace{suffix}", result["trace"], on_epoch=True)
            if self.plot and "density" in result and trainer.is_global_zero:
                import matplotlib.pyplot as plt

                fig = density_figure(result["density"], f"Hessian density{suffix}, epoch {trainer.current_epoch}")
                self.png_paths += log_figure(trainer, f"hessian/density{suffix}", fig, trainer.global_step,
                                             f"density{suffix.replace('/', '_')}_epoch{trainer.current_epoch}.png")
                plt.close(fig)

    def compute(self, module: nn.Module, params: list[torch.Tensor]) -> dict[str, Any]:
        """Eigenvalues, trace and density of the Hessian over ``params`` on the fixed batches."""
        op = HessianOperator(module, self.fixed.batches, loss_fn=self.loss_fn, params=params, bn_mode=self.bn_mode,
                             max_hvps=self.max_hvps)
        out: dict[str, Any] = {}
        try:
            if self.top_k:
                eig = top_eigenvalues(op, self.top_k, self.method, self.max_iters, self.tol, self.seed)
                out["eigenvalues"], out["eig_converged"] = eig.eigenvalues, eig.converged
            if self.trace_samples:
                tr = hutchinson_trace(op, self.trace_samples, self.tol, min(10, self.trace_samples), self.seed)
                out["trace"], out["trace_std_error"] = tr.trace, tr.std_error
            if self.density_probes:
                out["density"] = slq_density(op, self.density_probes, self.density_steps, self.seed)
        except HVPBudgetExceeded:
            pass  # what fitted in the budget is returned
        finally:
            op.release()
        out["num_hvps"] = op.num_hvps
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last": {k: {n: v for n, v in r.items() if n != "density"} for k, r in self.last.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))

