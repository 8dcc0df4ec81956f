"""Pure-torch BN statistics: moments, pooling, precise BN, the last-batches recorder, DDP reduction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lightning_lbo.batchnorm import (
    BatchNormMomentRecorder,
    batch_moments,
    batchnorm_layers,
    default_reduce_sum,
    estimate_precise_stats,
    pool_moments,
)
from lightning_lbo.capture import curvature_capture_paused


def channel_values(x: torch.Tensor) -> np.ndarray:
    """``[B, C, *]`` -> numpy ``[C, B * prod(*)]`` in float64."""
    x = x.detach().double().numpy()
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def numpy_stats(inputs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance per channel over all values of all inputs."""
    values = np.concatenate([channel_values(x) for x in inputs], axis=1)
    return values.mean(1), values.var(1, ddof=1)


def deep_bn_model() -> nn.Module:
    """BN on the input (its statistics are the data's), then conv-BN2d, then linear-BN1d."""
    return nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 2))


def capture_bn_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Second code path: inputs of each BN layer when a copy of the model runs each batch as in precise BN."""
    model = copy.deepcopy(model).eval()
    layers = batchnorm_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: seen[i].append(a[0].detach().clone()))
               for i, layer in enumerate(layers)]
    for layer in layers:
        layer.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (6, 3, 4, 5), (6, 3, 2, 3, 4)])
def test_batch_moments_match_numpy(shape):
    """Per-channel count, mean and m2 of 2-D to 5-D inputs agree with numpy."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    n, mean, m2 = batch_moments(x)
    values = channel_values(x)
    assert n == values.shape[1]
    np.testing.assert_allclose(mean.numpy(), values.mean(1), rtol=1e-12)
    np.testing.assert_allclose(m2.numpy(), values.var(1) * n, rtol=1e-12)


def test_pool_moments_is_mean_of_variances_plus_variance_of_means():
    """Pooling batches of unequal size gives the concatenation's statistics and Akiba's pooled variance."""
    batches = [torch.randn(b, 4, dtype=torch.float64) * (i + 1) + i for i, b in enumerate((3, 7, 12))]
    moments = [batch_moments(x) for x in batches]
    counts = torch.tensor([float(m[0]) for m in moments], dtype=torch.float64)
    total, mean, m2 = pool_moments(counts, torch.stack([m[1] for m in moments]), torch.stack([m[2] for m in moments]))
    ref_mean, ref_var = numpy_stats(batches)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose((m2 / (total - 1)).numpy(), ref_var, rtol=1e-12)
    # var = weighted mean of variances + weighted variance of means
    w = counts.numpy() / counts.numpy().sum()
    means = np.stack([channel_values(x).mean(1) for x in batches])
    variances = np.stack([channel_values(x).var(1) for x in batches])
    pooled = (w[:, None] * variances).sum(0) + (w[:, None] * (means - ref_mean) ** 2).sum(0)
    np.testing.assert_allclose((m2 / total).numpy(), pooled, rtol=1e-12)


def test_precise_stats_equal_full_data_numpy():
    """Precise BN gives the population mean and unbiased variance over all data, for every BN layer."""
    model = deep_bn_model()
    data = torch.randn(45, 2, 6, 6) * 3 + 2
    batches = list(data.split(8))  # 6 batches, the last one of 5
    stats = estimate_precise_stats(model, batches, num_batches=100, forward=model)
    assert stats.num_batches == 6 and stats.num_samples == 45
    mean0, var0 = numpy_stats([data])  # first BN sees the data itself
    np.testing.assert_allclose(stats.means[0].numpy(), mean0, rtol=1e-6)
    np.testing.assert_allclose(stats.variances[0].numpy(), var0, rtol=1e-6)
    captured = capture_bn_inputs(model, batches)
    for mean, var, inputs in zip(stats.means, stats.variances, captured, strict=True):
        ref_mean, ref_var = numpy_stats(inputs)
        np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-5)
    # torch's cumulative averaging (update_bn) averages per-batch variances: it misses the variance of the means.
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, reference)
    assert not np.allclose(reference[0].running_var.numpy(), var0, rtol=1e-3)
    stats.install()
    np.testing.assert_allclose(model[0].running_var.numpy(), var0, rtol=1e-6)


def test_precise_stats_restore_modes_and_settings():
    """Module modes, momentum, running buffers and num_batches_tracked are restored; nothing installed."""
    model = deep_bn_model().train()
    model[2].eval()
    model[6].momentum = None
    model[0].num_batches_tracked.fill_(7)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    estimate_precise_stats(model, [torch.randn(8, 2, 6, 6)] * 2, num_batches=2, forward=model)
    assert [m.training for m in model.modules()] == modes
    assert model[6].momentum is None and model[0].momentum == 0.1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_precise_stats_bad_input():
    """num_batches < 1 and a model without BN fail with messages naming the fix."""
    model = deep_bn_model()
    with pytest.raises(ValueError, match="Invalid num_batches: 0"):
        estimate_precise_stats(model, [], num_batches=0, forward=model)
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        estimate_precise_stats(nn.Linear(2, 2), [], num_batches=1, forward=model)


@pytest.mark.parametrize(("layer", "shape"), [(nn.SyncBatchNorm, (20, 3, 4)), (nn.BatchNorm1d, (20, 3, 4)),
                                              (nn.BatchNorm3d, (20, 3, 2, 2, 4))])
def test_precise_stats_other_batchnorm_types(layer, shape):
    """BatchNorm1d on sequences, BatchNorm3d and SyncBatchNorm (no process group) are estimated alike."""
    model = nn.Sequential(layer(3), nn.Linear(4, 2))
    data = torch.randn(shape) * 2 - 1
    stats = estimate_precise_stats(model, list(data.split(6)), num_batches=10, forward=model)
    ref_mean, ref_var = numpy_stats([data])
    np.testing.assert_allclose(stats.means[0].numpy(), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(stats.variances[0].numpy(), ref_var, rtol=1e-6)


@pytest.mark.parametrize("window", [1, 2])
def test_recorder_last_batches_match_single_batch_running_stats(window):
    """The window's pooled stats equal a momentum=1 BN's running stats on the concatenated last batches."""
    model = deep_bn_model().train()
    recorder = BatchNormMomentRecorder(batchnorm_layers(model), window=window).attach()
    batches = [torch.randn(b, 2, 6, 6) * (1 + b) for b in (5, 9, 6)]
    for x in batches:
        model(x)
    model.eval()
    model(batches[0])  # eval-mode passes are not recorded
    model.train()
    with curvature_capture_paused():
        model(batches[0] * 100)  # nor auxiliary passes of other callbacks
    stats = recorder.statistics()
    last = batches[-window:]
    assert stats.num_batches == window and stats.num_samples == sum(x.shape[0] for x in last)
    mean0, var0 = numpy_stats(last)
    np.testing.assert_allclose(stats.means[0].numpy(), mean0, rtol=1e-5)
    np.testing.assert_allclose(stats.variances[0].numpy(), var0, rtol=1e-5)
    single = nn.BatchNorm2d(2, momentum=1.0).train()
    single(torch.cat(last))
    torch.testing.assert_close(stats.variances[0].float(), single.running_var, rtol=1e-5, atol=1e-6)
    restored = BatchNormMomentRecorder(batchnorm_layers(model), window=window)
    restored.load_state_dict(recorder.state_dict())
    torch.testing.assert_close(restored.statistics().variances[2], stats.variances[2])


def check_ddp_reduction(rank: int, world_size: int) -> None:
    """2 ranks with different data give the statistics of one process on all the data (run inside a DDP worker).

    Called from the ddp_spawn test in test_batchnorm_stats_callback.py (one spawn serves both files).
    """
    assert world_size == 2
    torch.manual_seed(0)
    model = deep_bn_model()
    sizes = {0: (8, 8, 8), 1: (5, 11)}  # different data and unequal numbers of batches per rank
    gen = torch.Generator().manual_seed(1)
    data = {r: [torch.randn(b, 2, 6, 6, generator=gen) * (2 + r) + r for b in sizes[r]] for r in (0, 1)}
    reduce_sum = default_reduce_sum()
    assert reduce_sum is not None
    stats = estimate_precise_stats(model, data[rank], num_batches=10, forward=model, reduce_sum=reduce_sum)
    used = data[0][:2] + data[1][:2]  # the ranks agree to stop when rank 1 runs out
    assert stats.num_batches == 4 and stats.num_samples == sum(x.shape[0] for x in used)
    single = estimate_precise_stats(model, used, num_batches=10, forward=model)  # one process, all the data
    for a, b in zip(stats.means + stats.variances, single.means + single.variances, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.counts, single.counts)
    # Last batches: rank r's last batch pooled with the other rank's.
    model.train()
    recorder = BatchNormMomentRecorder(batchnorm_layers(model), window=1).attach()
    for x in data[rank]:
        model(x)
    last = recorder.statistics(reduce_sum)
    mean0, var0 = numpy_stats([data[0][-1], data[1][-1]])
    np.testing.assert_allclose(last.means[0].numpy(), mean0, rtol=1e-5)
    np.testing.assert_allclose(last.variances[0].numpy(), var0, rtol=1e-5)
    assert last.num_batches == 2

