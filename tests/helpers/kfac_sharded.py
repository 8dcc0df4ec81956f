"""Helpers for sharded K-FAC tests (``fully_shard`` / FSDP2 on CPU, gloo): models, batches, the 1-process oracle.

The oracle: P ranks, each with ``1/P`` of a global batch and ``fully_shard``-ed parameters, train like one
plain process on the whole global batch (float64). Models with BatchNorm see per-rank batch statistics, so
their reference forwards each rank's part as a micro-batch and accumulates ``loss / P`` (which K-FAC counts
as more examples: the same factors as averaging the ranks').
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IN_FEATURES, N_CLASSES, PER_RANK_BATCH, MAX_RANKS = 6, 3, 4, 4
IMAGE = (1, 8, 8)

#: K-FAC settings of the oracle runs: refreshes at steps 0, 2, 4 (factors) and 0, 3 (inverses), a KL clip
#: (a global reduction), L2 after preconditioning, weight rescaling (whole-weight norms), momentum.
KFAC_SETTINGS = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, weight_rescaling=True, damping=1e-2,
                     factor_update_interval=2, inverse_update_interval=3, kl_clip=1e-2)


def make_mlp() -> nn.Module:
    """Linear -> LayerNorm -> Tanh -> Linear -> Tanh -> Linear in float64 (odd sizes: uneven and empty shards)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, N_CLASSES)).double()


def make_cnn() -> nn.Module:
    """The package's SmallCNN (conv-BN-ReLU x3, linear head), narrow, float64."""
    from lightning_lbo.models import SmallCNN

    torch.manual_seed(0)
    return SmallCNN(in_channels=IMAGE[0], num_classes=N_CLASSES, channels=(3, 5, 6)).double()


VOCAB, SEQ_LEN = 11, 8


def make_gpt() -> nn.Module:
    """The GPT of ``lightning_lbo.lm``, tiny (2 layers, width 16, 2 heads, 8 positions), tied embeddings, float64:
    ``nn.MultiheadAttention`` (parameters besides weight/bias) and one weight shared by the embedding and head."""
    from lightning_lbo.lm import GPT

    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, seq_len=SEQ_LEN, d_model=16, n_heads=2, n_layers=2, d_ff=24,
               tie_embeddings=True).double()


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": make_mlp, "cnn": make_cnn, "gpt": make_gpt}
#: models whose forward depends on the batch it sees as a whole (BatchNorm): the reference accumulates parts
PER_RANK_STATISTICS = {"cnn"}


def shard(model: nn.Module, world_size: int) -> nn.Module:
    """``fully_shard`` every Linear/Conv2d/transformer block, then the root, on a 1-D CPU mesh (as a user would)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    # a transformer block as one unit (its attention and feed-forward layers with it), as users shard GPTs
    units = (nn.TransformerEncoderLayer,) if any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()) \
        else (nn.Linear, nn.Conv2d)
    for layer in model.modules():
        if isinstance(layer, units):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def global_batch(model_name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (``PER_RANK_BATCH * MAX_RANKS`` samples, whatever the world size)."""
    gen = torch.Generator().manual_seed(1000 + step)
    if model_name == "gpt":  # next-token prediction: tokens and their targets, [N, T] each
        tokens = torch.randint(0, VOCAB, (PER_RANK_BATCH * MAX_RANKS, SEQ_LEN + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]
    shape = (IN_FEATURES,) if model_name == "mlp" else IMAGE
    x = torch.randn(PER_RANK_BATCH * MAX_RANKS, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (PER_RANK_BATCH * MAX_RANKS,), generator=gen)
    return x, y


def part(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s contiguous share of a batch."""
    x, y = batch
    size = x.shape[0] // world_size
    return x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``full_tensor()`` of a DTensor (a collective: call on every rank), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model(x)``; for sequence logits ``[N, T, V]`` the mean over all positions."""
    out = model(x)
    return F.cross_entropy(out.transpose(1, 2) if out.dim() == 3 else out, y)


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str, step: int,
                   world_size: int) -> None:
    """One step of the 1-process oracle on the global batch of ``step``."""
    optimizer.zero_grad()
    batch = global_batch(model_name, step)
    if model_name in PER_RANK_STATISTICS:
        for rank in range(world_size):
            x, y = part(batch, rank, world_size)
            (loss(model, x, y) / world_size).backward()
    else:
        loss(model, *batch).backward()
    optimizer.step()


def sharded_step(model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str, step: int, rank: int,
                 world_size: int, poison: bool = False) -> None:
    """One step of a sharded rank on its share of the global batch (``poison``: a NaN in its inputs)."""
    optimizer.zero_grad()
    x, y = part(global_batch(model_name, step), rank, world_size)
    if poison:
        x = x.clone()
        x[0].view(-1)[0] = float("nan")
    loss(model, x, y).backward()
    optimizer.step()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_equal_to_reference(model: nn.Module, reference: nn.Module, context: str, tol: float = 1e-6) -> float:
    """Every (possibly sharded) parameter of ``model`` within ``tol`` relative error of ``reference``'s; the worst."""
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        error = relative_error(full(p.detach()), q.detach())
        worst = max(worst, error)
        assert error <= tol, f"{context}, {name}: relative error {error:.2e}"
    return worst
