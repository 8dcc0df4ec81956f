"""Ghost batch norm (lightning_lbo.batchnorm): against per-chunk F.batch_norm, exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.batchnorm import (
    BatchNormMomentRecorder,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    batchnorm_layers,
    convert_to_ghost_batchnorm,
    estimate_precise_stats,
    ghost_chunk_sizes,
)
from tests.helpers.ddp import spawn_gloo

EXACT = dict(rtol=0.0, atol=0.0)


def _reference_training(x, bn: nn.modules.batchnorm._BatchNorm, sizes):
    """``F.batch_norm`` chunk by chunk on copies of ``bn``'s buffers (the momentum logic of torch's BN)."""
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    tracked = int(bn.num_batches_tracked)
    outs = []
    for chunk in x.split(sizes):
        tracked += 1
        factor = 1.0 / tracked if bn.momentum is None else bn.momentum
        outs.append(F.batch_norm(chunk, mean, var, bn.weight, bn.bias, True, factor, bn.eps))
    return torch.cat(outs), mean, var, tracked


def _randomised(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def test_ghost_chunk_sizes_rule():
    assert ghost_chunk_sizes(256, 128) == [128, 128]
    assert ghost_chunk_sizes(300, 128) == [128, 128, 44]  # remainder: a smaller last chunk
    assert ghost_chunk_sizes(257, 128) == [128, 129]  # a remainder of one row joins the chunk before it
    assert ghost_chunk_sizes(100, 128) == [100]  # at most g rows: plain batch norm
    assert ghost_chunk_sizes(1, 128) == [1]
    assert sum(ghost_chunk_sizes(55000 % 2048, 128)) == 55000 % 2048
    with pytest.raises(ValueError, match="virtual_batch_size"):
        ghost_chunk_sizes(10, 0)


@pytest.mark.parametrize("cls, shape", [(GhostBatchNorm1d, (4,)), (GhostBatchNorm1d, (4, 5)),
                                        (GhostBatchNorm2d, (3, 4, 4)), (GhostBatchNorm3d, (2, 3, 2, 2))])
@pytest.mark.parametrize("batch", [64, 70, 65])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batchnorm_training_matches_per_chunk_batch_norm(cls, shape, batch, momentum):
    torch.manual_seed(0)
    bn = _randomised(cls(shape[0], virtual_batch_size=16, momentum=momentum))
    x = torch.randn(batch, *shape) * 3 + 1
    sizes = ghost_chunk_sizes(batch, 16)
    expected, mean, var, tracked = _reference_training(x, bn, sizes)
    out = bn(x)
    torch.testing.assert_close(out, expected, **EXACT)
    torch.testing.assert_close(bn.running_mean, mean, **EXACT)
    torch.testing.assert_close(bn.running_var, var, **EXACT)
    assert int(bn.num_batches_tracked) == tracked == len(sizes)
    # and it is not plain batch norm over the whole batch
    assert not torch.allclose(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps), atol=1e-3)


def test_ghost_batchnorm_gradients_match_per_chunk_batch_norm():
    torch.manual_seed(1)
    bn = _randomised(GhostBatchNorm2d(3, virtual_batch_size=8))
    ref = copy.deepcopy(bn)
    x = torch.randn(27, 3, 5, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(27, 3, 5, 5)
    (bn(x) * upstream).sum().backward()
    out_ref = torch.cat([F.batch_norm(c, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
                         for c in x_ref.split(ghost_chunk_sizes(27, 8))])
    (out_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **EXACT)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, **EXACT)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, **EXACT)


def test_ghost_batchnorm_large_virtual_batch_is_plain_batch_norm():
    torch.manual_seed(2)
    ghost, plain = GhostBatchNorm1d(6, virtual_batch_size=64), nn.BatchNorm1d(6)
    plain.load_state_dict(_randomised(ghost).state_dict())
    x = torch.randn(40, 6)
    torch.testing.assert_close(ghost(x), plain(x), **EXACT)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(dict(ghost.named_buffers())[name], buffer, **EXACT)


def test_ghost_batchnorm_eval_uses_running_statistics():
    torch.manual_seed(3)
    ghost = _randomised(GhostBatchNorm2d(3, virtual_batch_size=4)).eval()
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(ghost.state_dict())
    x = torch.randn(10, 3, 4, 4)
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    torch.testing.assert_close(ghost(x), plain(x), **EXACT)
    for key, value in ghost.state_dict().items():
        torch.testing.assert_close(value, before[key], **EXACT)


def test_ghost_batchnorm_without_running_stats_normalises_by_chunks_in_eval():
    bn = GhostBatchNorm1d(4, virtual_batch_size=8, track_running_stats=False).eval()
    x = torch.randn(20, 4)
    expected = torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                          for c in x.split(ghost_chunk_sizes(20, 8))])
    torch.testing.assert_close(bn(x), expected, **EXACT)


def test_ghost_batchnorm_normalized_input_is_the_forward_without_affine():
    torch.manual_seed(4)
    bn = _randomised(GhostBatchNorm2d(3, virtual_batch_size=8))
    x = torch.randn(30, 3, 4, 4)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x_hat = bn.normalized_input(x)
    for key, value in bn.state_dict().items():  # updates nothing
        torch.testing.assert_close(value, state[key], **EXACT)
    expected = torch.cat([F.batch_norm(c, None, None, None, None, True, 0.0, bn.eps)
                          for c in x.split(ghost_chunk_sizes(30, 8))])
    torch.testing.assert_close(x_hat, expected, **EXACT)
    torch.testing.assert_close(bn(x), x_hat * bn.weight[:, None, None] + bn.bias[:, None, None])
    bn.eval()
    expected_eval = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    torch.testing.assert_close(bn.normalized_input(x), expected_eval)


def test_ghost_batchnorm_invalid_virtual_batch_size_raises():
    with pytest.raises(ValueError, match="Invalid virtual_batch_size: 0; use a positive integer"):
        GhostBatchNorm1d(4, virtual_batch_size=0)
    with pytest.raises(ValueError, match="Invalid virtual_batch_size"):
        convert_to_ghost_batchnorm(nn.BatchNorm1d(3), 2.5)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Sequential(nn.Linear(12, 5, bias=False), nn.BatchNorm1d(5, momentum=None)),
                         nn.Linear(5, 2))


def test_convert_to_ghost_batchnorm_keeps_parameters_buffers_and_settings():
    torch.manual_seed(5)
    model = _model()
    for bn in batchnorm_layers(model):
        _randomised(bn)
        bn.num_batches_tracked.fill_(7)
    model[4].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert convert_to_ghost_batchnorm(model, 2) is model
    assert type(model[1]) is GhostBatchNorm2d and type(model[4][1]) is GhostBatchNorm1d
    assert isinstance(model[1], nn.BatchNorm2d) and model[1].virtual_batch_size == 2
    assert model[4][1].momentum is None and not model[4][1].training and model[1].training
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # the optimizer still steps them
    assert optimizer.param_groups[0]["params"][2] is model[1].weight
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], **EXACT)
    assert "virtual_batch_size=2" in repr(model[1])
    convert_to_ghost_batchnorm(model, 4)  # already ghost: only the virtual batch size changes
    assert model[1].virtual_batch_size == 4 and type(model[1]) is GhostBatchNorm2d


def test_convert_to_ghost_batchnorm_training_matches_chunked_plain_model():
    torch.manual_seed(6)
    plain = _model()
    ghost = convert_to_ghost_batchnorm(copy.deepcopy(plain), 4)
    x = torch.randn(12, 1, 4, 4)
    # with chunks of 4 and nothing after the BN layers mixing rows, the ghost model is the plain one per chunk
    expected = torch.cat([plain(c) for c in x.split(4)])
    torch.testing.assert_close(ghost(x), expected, **EXACT)
    for (name, a), (_, b) in zip(ghost.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, **EXACT, msg=name)


def test_convert_to_ghost_batchnorm_refuses_sync_batchnorm():
    model = nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        convert_to_ghost_batchnorm(model, 8)


def test_ghost_batchnorm_state_dict_round_trip_with_plain_batchnorm():
    torch.manual_seed(7)
    plain = _model()
    for bn in batchnorm_layers(plain):
        _randomised(bn)
    ghost = convert_to_ghost_batchnorm(_model(), 4)
    ghost.load_state_dict(plain.state_dict())
    assert ghost.state_dict().keys() == plain.state_dict().keys()
    back = _model()
    back.load_state_dict(ghost.state_dict())
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[key], **EXACT)
    saved = copy.deepcopy(ghost)  # pickles (checkpoints, ddp_spawn)
    assert type(saved[1]) is GhostBatchNorm2d and saved[1].virtual_batch_size == 4


def test_ghost_batchnorm_precise_stats_see_ghost_normalised_inputs():
    """Precise BN on a ghost model: population moments of each BN input, the later layers' inputs computed
    through the ghost-normalised earlier layers (as in training)."""
    torch.manual_seed(8)
    ghost = convert_to_ghost_batchnorm(_model(), 4)
    batches = [torch.randn(16, 1, 4, 4) * 2 + 0.5 for _ in range(3)]
    captured = []
    handle = ghost[4][1].register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().clone()))
    state = {k: v.clone() for k, v in ghost.state_dict().items()}
    stats = estimate_precise_stats(ghost, batches, 3, forward=ghost)
    for key, value in ghost.state_dict().items():  # nothing installed or updated
        torch.testing.assert_close(value, state[key], **EXACT)
    handle.remove()
    inputs = torch.cat(captured).double()
    torch.testing.assert_close(stats.means[1], inputs.mean(0))
    torch.testing.assert_close(stats.variances[1], inputs.var(0, correction=1))
    # the plain model's second BN input differs: the pass normalised by chunks
    plain = _model()
    plain.load_state_dict(ghost.state_dict())
    plain_stats = estimate_precise_stats(plain, batches, 3, forward=plain)
    assert not torch.allclose(plain_stats.means[1], stats.means[1], atol=1e-4)


def test_ghost_batchnorm_last_batches_window_pools_the_whole_device_batch():
    torch.manual_seed(9)
    ghost = convert_to_ghost_batchnorm(_model(), 4)
    recorder = BatchNormMomentRecorder(batchnorm_layers(ghost), window=1).attach()
    ghost(torch.randn(16, 1, 4, 4))
    x = torch.randn(14, 1, 4, 4)
    conv_out = ghost[0](x).detach()
    ghost(x)
    stats = recorder.statistics()
    values = conv_out.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(stats.means[0], values.mean(1))
    torch.testing.assert_close(stats.variances[0], values.var(1, correction=1))
    assert stats.num_samples == 14


def _ddp_worker(rank: int, world_size: int, state: dict, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = convert_to_ghost_batchnorm(_model(), 4)
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(2):
        local = slice(rank * 10, (rank + 1) * 10)
        F.cross_entropy(ddp(inputs[step][local]), targets[step][local]).backward()
        optimizer.step()
        optimizer.zero_grad()
    # single-process reference: each rank's batch chunked on its own, gradients averaged over ranks;
    # DDP broadcasts rank 0's buffers before each forward, so rank 0's running statistics are kept
    ref = convert_to_ghost_batchnorm(_model(), 4)
    ref.load_state_dict(state)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        losses, after = [], []
        for r in range(world_size):  # each rank's forward on its own copy of the buffers
            buffers = {k: v.clone() for k, v in ref.named_buffers()}
            logits = torch.func.functional_call(ref, {**dict(ref.named_parameters()), **buffers},
                                                (inputs[step][r * 10:(r + 1) * 10],))
            losses.append(F.cross_entropy(logits, targets[step][r * 10:(r + 1) * 10]))
            after.append(buffers)
        (sum(losses) / world_size).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for k, v in ref.named_buffers():  # the next step starts from rank 0's buffers
            v.copy_(after[0][k])
    for name, value in model.named_buffers():  # this rank's own update of its last batch
        torch.testing.assert_close(value, after[rank][name], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


def test_ghost_batchnorm_ddp_normalises_each_rank_batch_on_its_own():
    torch.manual_seed(10)
    state = convert_to_ghost_batchnorm(_model(), 4).state_dict()
    inputs = torch.randn(2, 20, 1, 4, 4)
    targets = torch.randint(0, 2, (2, 20))
    spawn_gloo(_ddp_worker, 2, (state, inputs, targets))


def test_ghost_batchnorm_with_batchnorm_stats_callback(pl_package, tmp_path):
    """BatchNormStats on a ghost model, through a Trainer: last_batches installs the moments of the last
    per-device batch, precise those of all training data with later layers fed by ghost-normalised inputs."""
    from torch.utils.data import DataLoader

    from lightning_lbo.callbacks.batchnorm_stats import BatchNormStats
    from tests.conftest import make_trainer
    from tests.test_batchnorm import capture_bn_inputs, numpy_stats
    from tests.test_batchnorm_stats_callback import LastInputsChecker, bn_model, module_for, synthetic_data

    pl = pl_package
    data = synthetic_data(96)
    train = DataLoader(data, batch_size=32, shuffle=False)
    val = DataLoader(data, batch_size=96)
    module = module_for(pl, convert_to_ghost_batchnorm(bn_model(dropout=False), 8))
    checker = LastInputsChecker(k=1)
    trainer = make_trainer(pl, tmp_path, max_epochs=2, callbacks=[BatchNormStats("last_batches", 1), checker])
    trainer.fit(module, train, val)
    assert checker.checked == 2

    module = module_for(pl, convert_to_ghost_batchnorm(bn_model(dropout=False), 8))
    callback = BatchNormStats(mode="precise", num_batches=3)
    make_trainer(pl, tmp_path, max_epochs=1, callbacks=[callback]).fit(module, train, val)
    assert callback.num_samples == 96
    layers = batchnorm_layers(module.model)
    assert all(type(layer).__name__.startswith("Ghost") for layer in layers)
    inputs = capture_bn_inputs(module.model, [x for x, _ in train])  # the ghost forward, chunks of 8
    for layer, seen in zip(layers, inputs, strict=True):
        mean, var = numpy_stats(seen)
        torch.testing.assert_close(layer.running_mean, torch.as_tensor(mean, dtype=torch.float32), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(layer.running_var, torch.as_tensor(var, dtype=torch.float32), rtol=1e-5, atol=1e-6)
