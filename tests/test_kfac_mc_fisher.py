"""The MC ("true") Fisher: label sampling, non-finite batches, the classes axis, unreached hooks, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.classifier import classifier_module_class
from lightning_lbo.compat import PYTORCH_LIGHTNING, lightning_package
from lightning_lbo.lm import GPT
from lightning_lbo.models import MLP
from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from lightning_lbo.optim.kfac.fisher import LabelSampler, Likelihood, sample_categorical, sampled_loss
from lightning_lbo.recipes import build_recipe
from tests.conftest import make_trainer
from tests.helpers.ddp import spawn_gloo

N, T, V = 4, 3, 5  # examples, positions, classes of the sequence model


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _bn_net():
    """Conv-BN-ReLU-Linear: the unit-wise BatchNorm block of the spngd recipe."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model, opt, seed, bad=False):
    x, y = _batch(seed=seed)
    if bad:
        x[0, 0, 0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in b.factors.items()} for b in opt.preconditioner.blocks],
            [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()])


def _assert_unchanged(model, opt, snapshot):
    params, factors, bufs = snapshot
    for p, old, buf in zip(model.parameters(), params, bufs, strict=True):
        assert torch.equal(p, old) and torch.equal(opt.state[p]["momentum_buffer"], buf)
    for block, old in zip(opt.preconditioner.blocks, factors, strict=True):
        assert old.keys() == block.factors.keys()
        assert all(torch.equal(block.factors[k], v) for k, v in old.items()), block.name


# ---------------------------------------------------------------------------------------------------- sampling
def test_sample_categorical_draws_from_the_softmax_and_never_raises():
    """40,000 exponential-race draws match softmax(logits) within 5 standard errors; NaN/inf rows get a label."""
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0])
    n = 40_000
    labels = sample_categorical(logits.expand(n, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=4).double() / n
    p = torch.softmax(logits.double(), 0)
    assert ((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
    bad = torch.tensor([[float("nan"), 0.0, 1.0], [float("inf"), 0.0, 0.0], [-float("inf")] * 3, [1e38, -1e38, 0]])
    drawn = sample_categorical(bad, torch.Generator().manual_seed(0))
    assert drawn.shape == (4,) and ((drawn >= 0) & (drawn < 3)).all()
    assert not torch.isfinite(sampled_loss(bad, Likelihood.CATEGORICAL, 1, torch.Generator().manual_seed(0)))


def test_label_sampler_stream_depends_on_seed_rank_and_draw_count_only():
    """Same (seed, rank, draws) -> the same numbers; another rank or draw -> other numbers; state round-trips."""
    def draw(sampler):
        return torch.rand(8, generator=sampler.generator(torch.device("cpu")))

    a, b = LabelSampler(3), LabelSampler(3)
    first = draw(a)
    assert torch.equal(first, draw(b)) and not torch.equal(first, draw(a))  # a's second draw differs
    other_rank = LabelSampler(3)
    other_rank.rank = 1
    assert not torch.equal(first, draw(other_rank))
    restored = LabelSampler(99)
    restored.load_state_dict(a.state_dict())
    assert torch.equal(draw(restored), draw(a))
    torch.manual_seed(5)
    assert LabelSampler().seed == 5  # the global seed, without consuming the global RNG


# ---------------------------------------------------------------------------------------------------- 26.2
@pytest.mark.parametrize("recipe", [None, "spngd"])
def test_kfac_mc_nonfinite_batch_on_a_refresh_step_skips_like_the_empirical_fisher(recipe):
    """fisher='mc' (plain, and the spngd recipe: stale statistics, unit-wise BN): a NaN batch on a refresh
    step raises nothing, leaves weights, factors and momentum bit-identical and is counted."""
    torch.manual_seed(0)
    if recipe is None:
        model = _net()
        opt = KFAC(model, lr=0.1, fisher="mc", factor_update_interval=1, inverse_update_interval=1)
    else:
        model = _bn_net()
        opt = build_recipe(recipe, 64, 3, 14).optimizer(model)
        assert opt.preconditioner.fisher.value == "mc" and opt.preconditioner.stale_statistics is not None
    _step(model, opt, 0)
    assert opt.preconditioner.capture.armed  # the next step refreshes
    before = _snapshot(model, opt)
    _step(model, opt, 1, bad=True)
    assert opt.nonfinite_skips.item() == 1 and opt.preconditioner.skipped_refreshes.item() >= 1
    _assert_unchanged(model, opt, before)
    _step(model, opt, 2)
    assert opt.nonfinite_skips.item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _mc_nonfinite_two_ranks(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, lr=0.1, fisher="mc", factor_update_interval=1, inverse_update_interval=1)
    opt.preconditioner.set_communicator(TorchDistributedCommunicator())
    ddp = DistributedDataParallel(model)
    _step(ddp, opt, 10 + rank)
    before = _snapshot(model, opt)
    _step(ddp, opt, 20 + rank, bad=rank == 0)  # NaN on rank 0 only
    assert opt.nonfinite_skips.item() == 1 and opt.preconditioner.skipped_refreshes.item() >= 1
    _assert_unchanged(model, opt, before)
    _step(ddp, opt, 30 + rank)
    counters = torch.stack([opt.nonfinite_skips, opt.preconditioner.skipped_refreshes]).float()
    state = torch.cat([p.detach().reshape(-1) for p in model.parameters()]
                      + [t.reshape(-1) for b in opt.preconditioner.blocks for t in b.factors.values()] + [counters])
    gathered = [torch.empty_like(state) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, state)
    assert torch.isfinite(state).all() and torch.equal(gathered[0], gathered[1])


def test_kfac_mc_nonfinite_batch_on_one_of_two_ranks_skips_on_both():
    """2 gloo ranks under DDP, fisher='mc', NaN on rank 0 only: no crash, both ranks skip, then stay equal."""
    spawn_gloo(_mc_nonfinite_two_ranks, world_size=2)


# ---------------------------------------------------------------------------------------------------- 26.4
class _SequenceNet(nn.Module):
    """``x [N, T, 3] -> logits [N, T, V]`` (classes last) or ``[N, V, T]``."""

    def __init__(self, classes_last: bool = True) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 6)
        self.head = nn.Linear(6, V)
        self.classes_last = classes_last

    def forward(self, x):
        logits = self.head(torch.tanh(self.hidden(x)))
        return logits if self.classes_last else logits.transpose(1, 2)


def _mc_factors(model, x, **kwargs):
    pre = KFACPreconditioner(model, fisher="mc", factor_update_interval=1, kl_clip=None, mc_seed=11, **kwargs)
    out = model(x)
    logits = out if getattr(model, "classes_last", True) else out.transpose(1, 2)
    F.cross_entropy(logits.reshape(-1, V), torch.zeros(N * T, dtype=torch.long)).backward()
    pre.step()
    return {name: pre.factors(getattr(model, name))["G"][0] for name in ("hidden", "head")}


def _brute_force_mc_g(model, x):
    """G of both layers from labels drawn over the V classes of each position and an explicit backward."""
    hidden = model.hidden(x)
    logits = model.head(torch.tanh(hidden)).reshape(-1, V)  # [N * T, V]
    generator = LabelSampler(11).generator(torch.device("cpu"))  # the first draw of mc_seed=11
    noise = torch.empty(N * T, V).exponential_(generator=generator)
    labels = (logits.detach() - noise.log()).argmax(1)
    g_hidden, = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), hidden)
    g_head = torch.softmax(logits.detach().double(), 1) - F.one_hot(labels, V).double()  # dCE/dlogits per position
    g_hidden = g_hidden.double().reshape(-1, 6)
    # one example's G averages its T positions: sum over N * T rows / (N * T)
    return {"hidden": g_hidden.T @ g_hidden / (N * T), "head": g_head.T @ g_head / (N * T)}


def test_kfac_mc_fisher_samples_over_the_classes_axis_of_sequence_logits():
    """Logits [N, T, V] with classes_dim=-1: both G factors equal labels drawn over V and backpropagated by
    hand; the default axis 1 (T) gives other factors, and the class-second model needs no setting."""
    torch.manual_seed(0)
    x = torch.randn(N, T, 3)
    model = _SequenceNet()
    reference = _brute_force_mc_g(model, x)
    got = _mc_factors(model, x, classes_dim=-1)
    for name, want in reference.items():
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-7)
    wrong_axis = _mc_factors(copy.deepcopy(model), x)  # classes_dim 1: labels over the T positions
    assert not torch.allclose(wrong_axis["head"].double(), reference["head"], rtol=1e-3, atol=1e-5)
    class_second = copy.deepcopy(model)
    class_second.classes_last = False
    for name, g in _mc_factors(class_second, x).items():
        torch.testing.assert_close(g.double(), reference[name], rtol=1e-5, atol=1e-7)


def test_kfac_mc_fisher_output_to_logits_may_return_a_new_tensor():
    """output_to_logits returning a transposed copy the loss never uses still captures G (once: 0 inverses)."""
    torch.manual_seed(0)
    x = torch.randn(N, T, 3)
    model = _SequenceNet()
    reference = _brute_force_mc_g(model, x)
    got = _mc_factors(model, x, output_to_logits=lambda out: out.transpose(1, 2))
    for name, want in reference.items():
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-7)


def test_gpt_declares_its_classes_axis_for_the_mc_fisher():
    """GPT classes-last and class-second, same weights and seed: identical MC factors on every layer."""
    tokens = torch.randint(0, 11, (3, 6))
    factors = []
    for classes_last in (True, False):
        torch.manual_seed(0)
        model = GPT(vocab_size=11, seq_len=6, d_model=8, n_heads=2, n_layers=1, classes_last=classes_last)
        pre = KFACPreconditioner(model, fisher="mc", factor_update_interval=1, kl_clip=None, mc_seed=3)
        logits = model(tokens)
        F.cross_entropy(logits.transpose(1, 2) if classes_last else logits, tokens).backward()
        pre.step()
        factors.append({(b.name, s): t.clone() for b in pre.blocks for s, t in b.factors.items()})
    assert factors[0].keys() == factors[1].keys()
    for key, value in factors[0].items():
        torch.testing.assert_close(factors[1][key], value, rtol=1e-5, atol=1e-7, msg=str(key))
    assert GPT(classes_last=True).logits_classes_dim == -1 and GPT(classes_last=False).logits_classes_dim == 1


def test_causal_lm_module_declares_the_classes_axis_of_its_model():
    """CausalLMModule (the root K-FAC binds to) reports its model's layout to the MC Fisher."""
    from lightning_lbo.lm import causal_lm_module_class

    module_class = causal_lm_module_class(PYTORCH_LIGHTNING)
    assert module_class(model_kwargs=dict(seq_len=4, d_model=8, n_heads=2, n_layers=1)).logits_classes_dim == -1
    assert module_class(model_kwargs=dict(seq_len=4, d_model=8, n_heads=2, n_layers=1,
                                          classes_last=False)).logits_classes_dim == 1


def test_kfac_mc_hook_never_reached_by_the_backward_is_reported():
    """The loss does not use the model's output: 'never reached', naming output_to_logits and classes_dim."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    pre = KFACPreconditioner(model, fisher="mc", factor_update_interval=1, kl_clip=None)
    hidden = []
    model[1].register_forward_hook(lambda module, inputs, output: hidden.append(output))
    model(torch.randn(6, 4))
    hidden[0].pow(2).sum().backward()  # a loss on an intermediate tensor: the logits get no gradient
    with pytest.warns(RuntimeWarning, match=r"no output-gradient statistic for \['0', '2'\].*training backward "
                                            r"never reached.*output_to_logits.*classes_dim=-1"):
        pre.step()


def test_kfac_mc_layer_not_feeding_the_logits_is_reported():
    """An auxiliary head outside the logits' graph: the sampled-label backward 'does not reach' it, said once."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.head(h), self.aux(h)

    torch.manual_seed(0)
    model = TwoHeads()
    pre = KFACPreconditioner(model, fisher="mc", factor_update_interval=1, kl_clip=None,
                             output_to_logits=lambda out: out[0])
    logits, aux = model(torch.randn(6, 4))
    (F.cross_entropy(logits, torch.zeros(6, dtype=torch.long)) + aux.pow(2).mean()).backward()
    with pytest.warns(RuntimeWarning, match=r"statistic for \['aux'\].*does not reach these layers"):
        pre.step()
    assert "G" in pre.factors(model.head) and "G" not in pre.factors(model.aux)


def test_kfac_mc_settings_are_checked_at_construction():
    """classes_dim / mc_seed where they are ignored or invalid: ValueError naming the fix."""
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"classes_dim=-1 applies to fisher='mc'.*likelihood='categorical' only"):
        KFACPreconditioner(model, classes_dim=-1)
    with pytest.raises(ValueError, match="classes_dim=-1 applies to fisher='mc'"):
        KFACPreconditioner(model, fisher="mc", likelihood="gaussian", classes_dim=-1)
    with pytest.raises(ValueError, match=r"Invalid classes_dim: 0.*axis 0 is the examples"):
        KFACPreconditioner(model, fisher="mc", classes_dim=0)
    with pytest.raises(ValueError, match="mc_seed=1 seeds the labels of fisher='mc' only"):
        KFAC(model, mc_seed=1)
    with pytest.raises(ValueError, match="Invalid mc_seed: -1"):
        KFAC(model, fisher="mc", mc_seed=-1)
    with pytest.raises(ValueError, match=r"classes_dim=2 of the logits, which have shape \(4, 2\)"):
        sampled_loss(torch.zeros(4, 2), Likelihood.CATEGORICAL, classes_dim=2)


# ---------------------------------------------------------------------------------------------------- 26.7 (MC)
def test_kfac_mc_state_dict_resume_equals_uninterrupted_run_bit_for_bit():
    """fisher='mc': 3 steps, state_dict, a new model and optimizer (another global seed) loaded, 3 steps
    == 6 steps uninterrupted, exactly (the label stream is in the checkpoint, not the global RNG)."""
    kw = dict(lr=0.05, momentum=0.9, fisher="mc", factor_update_interval=1, inverse_update_interval=2,
              factor_decay=0.5)
    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, **kw)
    for i in range(3):
        _step(model, opt, i)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for i in range(3, 6):
        _step(model, opt, i)
    torch.manual_seed(1234)
    resumed = _net()
    resumed.load_state_dict(saved_model)
    opt2 = KFAC(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    for i in range(3, 6):
        _step(resumed, opt2, i)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt.preconditioner.blocks, opt2.preconditioner.blocks, strict=True):
        assert all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)
    assert saved_opt["kfac"]["mc_sampling"] == {"seed": 0, "draws": 3}  # 3 refreshes drew labels


def _mc_resume_two_ranks(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

    def build(seed):
        torch.manual_seed(seed)
        model = _net()
        opt = KFAC(model, lr=0.05, momentum=0.9, fisher="mc", factor_update_interval=1, inverse_update_interval=2)
        opt.preconditioner.set_communicator(TorchDistributedCommunicator())
        return model, DistributedDataParallel(model), opt

    model, ddp, opt = build(0)
    for i in range(3):
        _step(ddp, opt, 100 * rank + i)
    checkpoint = [copy.deepcopy((model.state_dict(), opt.state_dict()))] if rank == 0 else [None]
    torch.distributed.broadcast_object_list(checkpoint, src=0)  # what Lightning does: rank 0 writes, all load
    for i in range(3, 6):
        _step(ddp, opt, 100 * rank + i)
    resumed, resumed_ddp, resumed_opt = build(1234 + rank)
    resumed.load_state_dict(checkpoint[0][0])
    resumed_opt.load_state_dict(checkpoint[0][1])
    for i in range(3, 6):
        _step(resumed_ddp, resumed_opt, 100 * rank + i)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_kfac_mc_resume_from_rank_zero_checkpoint_on_two_ranks_bit_for_bit():
    """2 gloo ranks, fisher='mc': every rank resumed from rank 0's checkpoint continues its own label stream;
    weights equal the uninterrupted run exactly."""
    spawn_gloo(_mc_resume_two_ranks, world_size=2)


def _tiny_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 4, 4, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_kfac_mc_lightning_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    """Lightning: 2 epochs == 1 epoch, checkpoint, resume (another global seed) for 1 epoch, weights equal exactly."""
    pl = lightning_package(PYTORCH_LIGHTNING)

    def fit(seed, callbacks=(), ckpt_path=None):
        torch.manual_seed(seed)
        module = classifier_module_class(PYTORCH_LIGHTNING)(
            MLP(in_features=16, hidden=(8,), num_classes=2), num_classes=2,
            optimizer=lambda m: KFAC(m, lr=0.05, fisher="mc", factor_update_interval=1, inverse_update_interval=2))
        trainer = make_trainer(pl, tmp_path, max_epochs=2, limit_val_batches=0, callbacks=list(callbacks),
                               enable_checkpointing=bool(callbacks))
        trainer.fit(module, train_dataloaders=_tiny_loader(), ckpt_path=ckpt_path)
        return module, trainer.optimizers[0]

    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", every_n_epochs=1,
                                              save_top_k=-1)
    full, full_opt = fit(0, [checkpoint])
    resumed, resumed_opt = fit(7, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert full_opt.preconditioner.steps == resumed_opt.preconditioner.steps == 6
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert math.isfinite(sum(p.sum().item() for p in resumed.parameters()))
    assert resumed_opt.preconditioner.label_sampler.state_dict() == {"seed": 0, "draws": 6}
