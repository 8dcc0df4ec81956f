"""Goal 3's diagnosis: ``B_simple`` and the Hessian-weighted ``B_noise`` computed exactly along a fixed-128 run.

McCandlish et al. (arXiv 1812.06162, eq. 2.8-2.9): the critical batch is ``B_noise = tr(H Sigma) / G^T H G``;
``B_simple = tr(Sigma) / |G|^2`` (what :class:`~lightning_lbo.callbacks.GradientNoiseScale` estimates)
equals it when the Hessian is a multiple of the identity. This script trains the fixed-128 recipe of
``benchmarks/adaptive_batch.py`` (momentum SGD, Nesterov 0.9, wd 5e-4, LR 0.1, cosine over the
ladder's epochs; a plain loop, no warmup at 128) and at chosen steps measures, with batch-norm in eval
mode (running statistics: per-example gradients are then defined):

* ``|G|^2`` and ``tr(Sigma)`` from per-example gradients (``torch.func.vmap(grad)``) of ``n_examples``
  random training images, ``G`` from ``n_mean`` images (``|G|^2`` corrected for its sampling noise);
* ``tr(H Sigma)`` as the mean of ``d_i^T H d_i`` over ``n_hvp`` per-example deviations ``d_i = g_i - G``
  and ``G^T H G``, with ``H`` the Hessian of the mean loss on ``hessian_batch`` images (forward-over-reverse HVPs);
* and, as the advisor measures it (train-mode BN, two halves of 128), the mean of ``probes`` probes.

Each point is cached in ``adaptive_batch_results/<model>/exact-noise-s<seed>.json``; one slot, one thread::

    MALLOC_MMAP_MAX_=0 nice -n 5 python benchmarks/noise_scale_exact.py --model cnn --seed 0 --at 300 767 1290
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.adaptive_batch import BASE_BATCH, BASE_LR, EPOCHS, MODEL_SPECS, RESULTS, TARGETS  # noqa: E402


def measure(model: torch.nn.Module, data, args: argparse.Namespace, gen: torch.Generator) -> dict[str, float]:
    from lightning_lbo.noise_scale import noise_scale_terms, split_batch_sq_norms

    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    def example_loss(p, x, y):
        return loss(p, x[None], y[None])

    perm = torch.randperm(len(data), generator=gen)
    x_all, y_all = data.__getitems__(perm[:args.n_mean].tolist())
    mean_g = torch.zeros(sum(p.numel() for p in params.values()))
    for i in range(0, args.n_mean, 1024):
        g = grad(loss)(params, x_all[i:i + 1024], y_all[i:i + 1024])
        mean_g += torch.cat([t.reshape(-1) for t in g.values()]) * (min(1024, args.n_mean - i) / args.n_mean)
    per_example = []
    for i in range(0, args.n_examples, 64):
        g = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x_all[i:i + 64], y_all[i:i + 64])
        per_example.append(torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], dim=1))
    dev = torch.cat(per_example) - mean_g
    trace = float(dev.pow(2).sum(1).mean())
    grad_sq = float(mean_g.pow(2).sum()) - trace / args.n_mean  # E|G_N|^2 = |G|^2 + tr(Sigma) / N

    xh, yh = x_all[-args.hessian_batch:], y_all[-args.hessian_batch:]
    shapes = {k: p.shape for k, p in params.items()}

    def hvp(v: torch.Tensor) -> torch.Tensor:
        tangent, offset = {}, 0
        for k, shape in shapes.items():
            n = math.prod(shape)
            tangent[k] = v[offset:offset + n].view(shape)
            offset += n
        out = jvp(lambda p: grad(loss)(p, xh, yh), (params,), (tangent,))[1]
        return torch.cat([t.reshape(-1) for t in out.values()])

    start = time.perf_counter()
    g_h_g = float(mean_g @ hvp(mean_g))
    quad = [float(d @ hvp(d)) for d in dev[:args.n_hvp]]
    tr_h_sigma = sum(quad) / len(quad)
    hvp_s = time.perf_counter() - start

    model.train()
    sums = torch.zeros(2, dtype=torch.float64)
    for i in range(args.probes):
        idx = perm[args.n_mean + i * BASE_BATCH: args.n_mean + (i + 1) * BASE_BATCH].tolist()
        small_sq, big_sq, b_small, b_big = split_batch_sq_norms(model, data.__getitems__(idx), model.parameters(),
                                                                loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        sums += torch.stack(noise_scale_terms(small_sq.double(), big_sq.double(), b_small, b_big))
    return {"grad_sq": grad_sq, "trace": trace, "b_simple_exact": trace / grad_sq, "g_h_g": g_h_g,
            "tr_h_sigma": tr_h_sigma, "tr_h_sigma_se": (torch.tensor(quad).std() / math.sqrt(len(quad))).item(),
            "b_noise_exact": tr_h_sigma / g_h_g, "b_simple_probe_train_bn": float(sums[1] / sums[0]),
            "probe_grad_sq": float(sums[0] / args.probes), "probe_trace": float(sums[1] / args.probes),
            "hvp_s": hvp_s}


def main() -> None:
    from benchmarks.bench_lock import bench_lock
    from lightning_lbo.data import FashionMNISTDataModule
    from lightning_lbo.models import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=tuple(MODEL_SPECS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", nargs="+", type=int, required=True, help="optimizer steps at which to measure")
    parser.add_argument("--n-examples", type=int, default=512)
    parser.add_argument("--n-mean", type=int, default=8192)
    parser.add_argument("--n-hvp", type=int, default=48)
    parser.add_argument("--hessian-batch", type=int, default=1024)
    parser.add_argument("--probes", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / args.model / f"exact-noise-s{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.exists() else []
    with bench_lock():
        torch.manual_seed(args.seed)
        name, kwargs = MODEL_SPECS[args.model]
        model = build_model(name, **kwargs)
        dm = FashionMNISTDataModule(batch_size=BASE_BATCH, val_size=5000, seed=args.seed)
        dm.setup("fit")
        total = EPOCHS[args.model] * (len(dm.train_set) // BASE_BATCH)
        opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        gen = torch.Generator().manual_seed(1000 + args.seed)
        step, loader = 0, None
        while step <= max(args.at):
            if step in args.at and not any(r["step"] == step for r in rows):
                row = {"step": step, "seed": args.seed, **measure(model, dm.train_set, args, gen)}
                model.eval()
                with torch.no_grad():
                    xv, yv = dm.val_set.__getitems__(list(range(len(dm.val_set))))
                    row["val_acc"] = float((model(xv).argmax(1) == yv).float().mean())
                model.train()
                rows.append(row)
                path.write_text(json.dumps(rows, indent=1))
                print(json.dumps(row), flush=True)
            if loader is None or (batch := next(loader, None)) is None:
                loader = iter(dm.train_dataloader())
                batch = next(loader)
            x, y = batch[:2]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            step += 1
    print(f"target {TARGETS[args.model]}; cached {path}")


if __name__ == "__main__":
    main()
