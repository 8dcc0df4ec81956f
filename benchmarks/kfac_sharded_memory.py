"""Memory, traffic and step time of K-FAC's placement modes under FSDP2 (``fully_shard``), against AdamW and DDP K-FAC.

P gloo ranks (CPU) train the GPT of :mod:`lightning_lbo.lm` (float32; attention excluded from K-FAC, since the
sharded path does not precondition ``nn.MultiheadAttention`` yet: its ``in_proj_weight`` gets the plain update; the
feed-forward Linears, the head, both embeddings and the LayerNorms are preconditioned) at a width where the
curvature dominates memory. Per rank and configuration:

* bytes of parameters (the local shards), optimizer state (AdamW's moments, K-FAC's momentum) and curvature
  (factors, inverses and inverse sources: :func:`~lightning_lbo.optim.kfac.shard_modes.curvature_bytes`), read
  from the tensors;
* the bytes K-FAC's collectives carried per step (its communicator's counters, on a refresh step and a plain step),
  over what FSDP2 (or DDP) moves anyway;
* median step time (meaningful only with ``--exclusive``-locked runs on a quiet machine);
* the training loss of each step (the same data for every configuration): the shard-local approximation against
  the exact modes.

Configurations: ``adamw_fsdp2``, ``kfac_ddp`` (unsharded parameters, DDP, K-FAC replicated), ``kfac_replicate``,
``kfac_owner``, ``kfac_local`` (FSDP2, ``shard_placement=``). Results: ``benchmarks/results/kfac_sharded_memory.
{json,md}``.

    python -m benchmarks.kfac_sharded_memory [--ranks 2 4] [--steps 12] [--d-model 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("adamw_fsdp2", "kfac_ddp", "kfac_replicate", "kfac_owner", "kfac_local")
KFAC_INTERVAL = 5  # factor and inverse refreshes at steps 0, 5, 10, ...


def _batch(step: int, rank: int, world: int, per_rank: int, seq_len: int, vocab: int):
    """A learnable stream: each sequence counts up by a stride from a random start (mod vocab); this rank's share of
    the global batch of ``step`` (the same global batch at every world size)."""
    gen = torch.Generator().manual_seed(10_000 + step)
    total = per_rank * world
    start = torch.randint(0, vocab, (total, 1), generator=gen)
    stride = torch.randint(1, 4, (total, 1), generator=gen)
    tokens = (start + stride * torch.arange(seq_len + 1)) % vocab
    part = tokens[rank * per_rank:(rank + 1) * per_rank]
    return part[:, :-1], part[:, 1:]


def _local_bytes(tensors) -> int:
    from lightning_lbo._dtensor import local_tensor

    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def _run_config(config: str, rank: int, world: int, args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from lightning_lbo import KFAC
    from lightning_lbo.lm import GPT
    from lightning_lbo.optim.kfac.distributed import default_communicator
    from lightning_lbo.optim.kfac.shard_modes import curvature_bytes

    torch.manual_seed(0)
    model = GPT(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_heads=4, n_layers=args.layers)
    forward = model
    if config == "kfac_ddp":
        forward = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    pre = None
    if config == "adamw_fsdp2":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        mode = "replicate" if config == "kfac_ddp" else config.removeprefix("kfac_")
        opt = KFAC(model, lr=0.05, momentum=0.9, damping=1e-2, kl_clip=1e-2, factor_update_interval=KFAC_INTERVAL,
                   inverse_update_interval=KFAC_INTERVAL, exclude=[nn.MultiheadAttention], shard_placement=mode)
        pre = opt.preconditioner
        pre.set_communicator(default_communicator())
    times, losses, step_bytes = [], [], []
    for step in range(args.steps):
        x, y = _batch(step, rank, world, args.per_rank, args.seq_len, args.vocab)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = forward(x)
        loss = F.cross_entropy(logits.transpose(1, 2), y)
        loss.backward()
        opt.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if pre is not None:
            step_bytes.append(dict(pre.placement.last_step_bytes))
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    out = {"param_bytes": _local_bytes(model.parameters()), "optimizer_state_bytes": _local_bytes(state),
           "curvature_bytes": curvature_bytes(pre) if pre is not None else 0,
           "step_time_s": statistics.median(times[2:]), "losses": losses}
    if pre is not None:
        refresh = step_bytes[KFAC_INTERVAL]  # a refresh + inversion step after the first
        plain = step_bytes[KFAC_INTERVAL + 1]
        out["kfac_bytes_refresh_step"] = refresh["total_bytes"]
        out["kfac_bytes_plain_step"] = plain["total_bytes"]
        out["kfac_bytes_detail_refresh_step"] = refresh
        out["kfac_bytes_detail_plain_step"] = plain
        out["preconditioned_layers"] = len(pre.blocks)
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        results = {}
        for config in CONFIGS:
            results[config] = _run_config(config, rank, world, args)
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            Path(path).write_text(json.dumps(gathered))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _summary(per_rank: list[dict], world: int) -> dict:
    """Per configuration: the largest per-rank figure of each memory kind, step time, K-FAC bytes, losses."""
    out = {}
    for config in CONFIGS:
        ranks = [r[config] for r in per_rank]
        row = {key: max(r[key] for r in ranks) for key in ("param_bytes", "optimizer_state_bytes", "curvature_bytes")}
        row["curvature_bytes_per_rank"] = [r["curvature_bytes"] for r in ranks]
        row["step_time_s"] = max(r["step_time_s"] for r in ranks)
        for key in ("kfac_bytes_refresh_step", "kfac_bytes_plain_step", "kfac_bytes_detail_refresh_step",
                    "kfac_bytes_detail_plain_step"):
            if key in ranks[0]:
                row[key] = ranks[0][key]
        row["losses"] = ranks[0]["losses"]
        out[config] = row
    for config, row in out.items():
        for kind in ("refresh", "plain"):
            detail = row.get(f"kfac_bytes_detail_{kind}_step")
            if detail is not None:
                row[f"kfac_wire_bytes_{kind}_step"] = round(_wire_bytes(detail, world, config))
    whole = per_rank[0]["kfac_ddp"]["param_bytes"]  # DDP: every rank holds the whole model
    out["adamw_fsdp2"]["fsdp_wire_bytes_per_step"] = round(3 * (world - 1) / world * whole)
    out["kfac_ddp"]["ddp_wire_bytes_per_step"] = round(2 * (world - 1) / world * whole)
    base = out["kfac_ddp"]["curvature_bytes"]
    for row in out.values():
        row["curvature_vs_ddp_kfac"] = row["curvature_bytes"] / base if base else None
        row["step_time_vs_adamw"] = row["step_time_s"] / out["adamw_fsdp2"]["step_time_s"]
    return out


def _wire_bytes(detail: dict, world: int, config: str) -> float:
    """Bytes per rank on the wire (sent + received, averaged over ranks) under ring/tree algorithms, from the
    counters' payloads: an all-reduce moves ``2 (P-1)/P`` of its payload per rank, a broadcast or an all-gather
    ``(P-1)/P``, a gather to (or scatter from) one rank ``(P-1)/P`` in all, i.e. ``(P-1)/P^2`` per rank on
    average (the owner carries ``(P-1)/P`` of it)."""
    p = world
    per_rank_gather = (p - 1) / p ** 2 if config == "kfac_owner" else (p - 1) / p  # owner: gather; others: all-gather
    return (2 * (p - 1) / p * (detail["factor_bytes"] + detail["decision_bytes"])
            + (p - 1) / p * detail["broadcast_bytes"]
            + per_rank_gather * (detail["shard_gather_bytes"] + detail.get("shard_scatter_bytes", 0)))


def _markdown(results: dict, args: argparse.Namespace, timed: bool) -> str:
    lines = ["# K-FAC placement modes under FSDP2: memory, traffic, step time (CPU, gloo)\n",
             f"GPT of `lightning_lbo.lm`: d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, "
             f"seq_len {args.seq_len}, {args.per_rank} sequences per rank, float32; K-FAC on the feed-forward "
             "Linears, head, embeddings and LayerNorms (attention excluded: plain update); factor and inverse "
             f"refresh every {KFAC_INTERVAL} steps, {args.steps} steps. Per-rank figures are the largest rank's. "
             "K-FAC bytes: the payload its collectives carried (communicator counters), on top of FSDP2's own "
             "all-gathers and reduce-scatters (or DDP's all-reduce), which are the same with AdamW."
             + ("" if timed else " Step times were NOT measured under the exclusive lock: ignore them."), ""]
    for world, summary in results.items():
        lines += [f"## P = {world}", "",
                  "| configuration | params B/rank | optimizer state B/rank | curvature B/rank | curvature vs DDP "
                  "K-FAC | K-FAC payload B, refresh step | K-FAC payload B, plain step | K-FAC wire B/rank, refresh "
                  "step | K-FAC wire B/rank, plain step | step time s | vs AdamW | loss step 0 -> last |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for config, row in summary.items():
            ratio = row["curvature_vs_ddp_kfac"]
            lines.append(f"| {config} | {row['param_bytes']:,} | {row['optimizer_state_bytes']:,} | "
                         f"{row['curvature_bytes']:,} | {'-' if not row['curvature_bytes'] else f'{ratio:.3f}'} | "
                         f"{row.get('kfac_bytes_refresh_step', 0):,} | {row.get('kfac_bytes_plain_step', 0):,} | "
                         f"{row.get('kfac_wire_bytes_refresh_step', 0):,} | "
                         f"{row.get('kfac_wire_bytes_plain_step', 0):,} | "
                         f"{row['step_time_s']:.3f} | {row['step_time_vs_adamw']:.2f} | "
                         f"{row['losses'][0]:.3f} -> {row['losses'][-1]:.3f} |")
        owner, local = summary["kfac_owner"]["losses"], summary["kfac_local"]["losses"]
        worst = max(abs(a - b) for a, b in zip(owner, local, strict=True))
        lines += ["", f"Traffic of the base engines per rank and step (estimated, wire): FSDP2 (all-gather of the "
                      f"parameters in forward and backward, reduce-scatter of the gradients) "
                      f"{summary['adamw_fsdp2']['fsdp_wire_bytes_per_step']:,} B; DDP (gradient all-reduce) "
                      f"{summary['kfac_ddp']['ddp_wire_bytes_per_step']:,} B. K-FAC's columns are on top of these."]
        lines += ["", f"Shard-local vs exact (owner) training loss, per step: "
                      f"{', '.join(f'{b:.3f}/{a:.3f}' for a, b in zip(owner, local, strict=True))} "
                      f"(largest gap {worst:.3f}).", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch.multiprocessing as mp

    from tests.helpers.ddp import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--per-rank", type=int, default=8)
    parser.add_argument("--timed", action="store_true", help="step times are honest (run under the exclusive lock)")
    parser.add_argument("--out", default=str(RESULTS / "kfac_sharded_memory"))
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 ranks (a smoke run; nothing written)")
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.d_model, args.steps, args.vocab = [2], 32, 8, 64
    results = {}
    for world in args.ranks:
        path = f"/tmp/kfac_sharded_memory_{world}.json"
        mp.spawn(_worker, args=(world, free_port(), args, path), nprocs=world, join=True)
        results[world] = _summary(json.loads(Path(path).read_text()), world)
    text = _markdown(results, args, args.timed)
    print(text)
    if not args.quick:
        Path(f"{args.out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        Path(f"{args.out}.md").write_text(text)


if __name__ == "__main__":
    main()
