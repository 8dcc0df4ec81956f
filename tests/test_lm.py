"""GCIDE text (reader, markup cleaning, split, byte windows, DataModule) and the GPT reference model."""

from __future__ import annotations

import gzip

import pytest
import torch

from lightning_lbo import text as lbo_text
from lightning_lbo.data import DataNotFoundError
from lightning_lbo.lm import GPT, causal_lm_module_class, next_token_loss
from lightning_lbo.text import (
    ByteSequenceDataset,
    clean_entry,
    decode_dictd_number,
    decode_tokens,
    gcide_datamodule_class,
    load_gcide_splits,
    locate_gcide,
    read_gcide,
    split_entries,
)
from tests.conftest import make_trainer

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _encode(value: int) -> str:
    digits = ""
    while True:
        digits = _B64[value % 64] + digits
        value //= 64
        if not value:
            return digits


def _fake_gcide(directory, entries: list[str], compress: bool = True, extra_headwords: int = 1) -> None:
    """A dictd pair: a licence pseudo-entry (two 00- headwords), then the entries, each under several headwords."""
    directory.mkdir(parents=True, exist_ok=True)
    chunks = ["00-database-info\n   GPL licence text\n\n"] + [e + "\n\n" for e in entries]
    data = "".join(chunks).encode()
    lines, offset = [], 0
    for i, chunk in enumerate(chunks):
        size = len(chunk.encode())
        name = "00-database-info" if i == 0 else f"word{i}"
        lines.append(f"{name}\t{_encode(offset)}\t{_encode(size)}")
        aliases = [f"{name}-alias{k}" for k in range(extra_headwords)] if i else ["00-gcide-info"]
        lines += [f"{alias}\t{_encode(offset)}\t{_encode(size)}" for alias in aliases]
        offset += size
    (directory / "gcide.index").write_text("\n".join(sorted(lines)) + "\n")
    if compress:
        with gzip.open(directory / "gcide.dict.dz", "wb") as fh:
            fh.write(data)
    else:
        (directory / "gcide.dict").write_bytes(data)


def test_decode_dictd_number_is_base64_positional():
    """'A' is 0, '/' is 63, and digits are base 64, most significant first; bad digits fail."""
    assert decode_dictd_number("A") == 0 and decode_dictd_number("/") == 63
    assert decode_dictd_number("BA") == 64 and decode_dictd_number("Ge") == 6 * 64 + 30
    for value in (0, 1, 63, 64, 4095, 123456789):
        assert decode_dictd_number(_encode(value)) == value
    with pytest.raises(ValueError, match="base64"):
        decode_dictd_number("A-B")


def test_clean_entry_strips_markup_keeps_words():
    """Source tags, pronunciations and braces go; accent codes become letters; one line per entry."""
    raw = ('Calorie \\Cal"o*rie\\, n. [F., fr. L. calor heat.] (Physics)\n'
           "   The unit of heat; from 0[deg] to 1[deg]. Compare {Foot\n   pound}.\n   [1913 Webster]\n\n"
           "   2. A caf['e] or d[ae]mon; calorif[`e]re. [Obs.]\n      [1913 Webster +PJC] Calorific\n")
    assert clean_entry(raw) == ("Calorie, n. [F., fr. L. calor heat.] (Physics) The unit of heat; from 0 deg to "
                                "1 deg. Compare Foot pound. 2. A cafe or daemon; calorifere. [Obs.] Calorific")


def test_read_gcide_follows_index_once_per_entry(tmp_path):
    """Entries come in file order, once each (aliases share a span), without the 00-database pseudo-entries."""
    entries = [f"Word{i} \\Wo*rd\\, n.\n   Meaning {i}.\n   [1913 Webster]" for i in range(5)]
    for compress in (True, False):
        d = tmp_path / f"c{compress}"
        _fake_gcide(d, entries, compress=compress, extra_headwords=2)
        got = read_gcide(locate_gcide(d))
        assert got == [f"Word{i}, n. Meaning {i}." for i in range(5)]
        assert read_gcide(locate_gcide(d), max_entries=2) == got[:2]


def test_split_entries_holds_out_whole_blocks():
    """Every 4th block of 3 entries is held out at val_fraction 0.25; together the splits are the corpus."""
    entries = [f"e{i}" for i in range(30)]
    train, val = split_entries(entries, val_fraction=0.25, block_entries=3)
    held = [f"e{i}" for b in range(10) if b % 4 == 3 for i in range(3 * b, 3 * b + 3)]
    assert val.decode().split() == held
    assert sorted(train.decode().split() + held, key=lambda s: int(s[1:])) == entries
    with pytest.raises(ValueError, match="val_fraction"):
        split_entries(entries, val_fraction=0.5)
    with pytest.raises(ValueError, match="no held-out block"):
        split_entries(entries[:5], val_fraction=0.1, block_entries=3)


def test_byte_sequence_dataset_targets_are_inputs_shifted():
    """y is x shifted by one token; a batch fetched by slicing equals the stacked items."""
    data = torch.arange(0, 200, dtype=torch.uint8)
    ds = ByteSequenceDataset(data, seq_len=16)
    assert len(ds) == (200 - 1) // 16
    x, y = ds[3]
    assert torch.equal(x, torch.arange(48, 64)) and torch.equal(y, torch.arange(49, 65))
    xb, yb = ds.__getitems__([5, 0, 3])
    assert torch.equal(xb, torch.stack([ds[i][0] for i in (5, 0, 3)]))
    assert torch.equal(yb, torch.stack([ds[i][1] for i in (5, 0, 3)]))
    assert len(ByteSequenceDataset(data, 16, max_sequences=4)) == 4
    with pytest.raises(ValueError, match="fewer than one sequence"):
        ByteSequenceDataset(data[:10], seq_len=16)


def test_datamodule_on_fake_dictionary_both_packages(tmp_path, pl_package):
    """The DataModule of each Lightning package yields [B, T] int64 batches of the cleaned text; bad sizes fail."""
    _fake_gcide(tmp_path / "dict", [f"Entry{i}, n. A definition number {i} of some length." for i in range(400)])
    cls = gcide_datamodule_class(pl_package.__name__)
    assert issubclass(cls, pl_package.LightningDataModule)
    dm = cls(batch_size=4, seq_len=16, data_dir=str(tmp_path / "dict"), cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert "definition number" in decode_tokens(dm.train_set.windows[:8, :-1].reshape(-1))
    assert len(dm.val_set) > 0 and list(tmp_path.joinpath("cache").glob("*.bin"))
    with pytest.raises(ValueError, match="seq_len"):
        cls(seq_len=0)
    with pytest.raises(ValueError, match="exceeds"):
        cls(batch_size=10**6, seq_len=16, data_dir=str(tmp_path / "dict"), cache_dir=str(tmp_path / "cache")).setup()


def test_locate_gcide_missing_names_the_fixes(tmp_path, monkeypatch):
    """Without the files anywhere the error names apt-get and data_dir."""
    monkeypatch.setattr(lbo_text, "DEBIAN_DICTD_DIR", tmp_path / "nowhere")
    monkeypatch.delenv("LBO_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="apt-get install dict-gcide") as err:
        locate_gcide(tmp_path)
    assert "data_dir" in str(err.value)


@pytest.mark.skipif(not (lbo_text.DEBIAN_DICTD_DIR / "gcide.index").is_file(),
                    reason="dict-gcide not installed: run `make data-text` (or apt-get install dict-gcide)")
def test_real_gcide_small_slice(tmp_path):
    """The first 2,000 real entries: words of the letter A, no markup left, both splits non-empty."""
    train, val = load_gcide_splits(val_fraction=0.1, max_entries=2000, cache_dir=str(tmp_path))
    text = decode_tokens(train[:20000])
    assert text.startswith("A") and "Webster]" not in text and "\\" not in text and "{" not in text
    assert val.numel() > 0.05 * train.numel()
    assert (train < 128).float().mean() > 0.999  # ASCII English


def test_gpt_is_causal_and_shaped():
    """Logits are [N, T, V]; changing a later token leaves every earlier position's logits unchanged."""
    model = GPT(vocab_size=32, seq_len=12, d_model=16, n_heads=2, n_layers=2).eval()
    x = torch.randint(0, 32, (3, 12))
    logits = model(x)
    assert logits.shape == (3, 12, 32)
    x2 = x.clone()
    x2[:, 7] = (x2[:, 7] + 1) % 32
    out2 = model(x2)
    torch.testing.assert_close(out2[:, :7], logits[:, :7])
    assert not torch.allclose(out2[:, 7:], logits[:, 7:])
    model.classes_last = False
    torch.testing.assert_close(model(x), logits.transpose(1, 2))
    with pytest.raises(ValueError, match="n_heads"):
        GPT(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="longer than seq_len"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_next_token_loss_is_mean_cross_entropy():
    """The loss is the mean over all N*T positions of -log softmax at the target."""
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    brute = -torch.stack([logits[n, t].log_softmax(-1)[targets[n, t]] for n in range(2) for t in range(5)]).mean()
    torch.testing.assert_close(next_token_loss(logits, targets), brute)
    torch.testing.assert_close(next_token_loss(logits.transpose(1, 2), targets, classes_last=False), brute)


def test_causal_lm_module_learns_repeating_text(tmp_path, pl_package):
    """A few AdamW steps on a periodic byte stream cut the validation loss well below log(V) (both packages)."""
    data = torch.tensor(list(b"abcdefgh" * 40), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(ByteSequenceDataset(data, 16), batch_size=8)
    module = causal_lm_module_class(pl_package.__name__)(
        optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        model_kwargs=dict(seq_len=16, d_model=16, n_heads=2, n_layers=1))
    trainer = make_trainer(pl_package, tmp_path, max_steps=40, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.callback_metrics["val_loss"] < 1.0 < torch.log(torch.tensor(256.0))
    with pytest.raises(ValueError, match="not both"):
        causal_lm_module_class(pl_package.__name__)(model=GPT(), model_kwargs={"d_model": 8})


def test_causal_lm_module_trains_with_kfac_on_every_layer(tmp_path, pl_package):
    """KFAC(self) with the MC Fisher on the class-second GPT: every layer's factors refresh, the loss falls."""
    from lightning_lbo.optim.kfac import KFAC

    data = torch.tensor(list(b"abcdefgh" * 40), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(ByteSequenceDataset(data, 16), batch_size=8)
    module = causal_lm_module_class(pl_package.__name__)(
        optimizer=lambda m: KFAC(m, lr=0.05, damping=1e-2, fisher="mc", factor_update_interval=1,
                                 inverse_update_interval=1),
        model_kwargs=dict(seq_len=16, d_model=16, n_heads=2, n_layers=1, classes_last=False))
    trainer = make_trainer(pl_package, tmp_path, max_steps=10, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    pre = trainer.optimizers[0].preconditioner
    assert {type(b).__name__ for b in pre.blocks} == {"EmbeddingBlock", "MultiheadAttentionBlock", "LinearBlock",
                                                       "UnitWiseBlock"}
    assert all(min(b.refreshes.values()) == 10 for b in pre.blocks)
    assert trainer.callback_metrics["val_loss"] < 1.0 < torch.log(torch.tensor(256.0))


def _lm_run(lr: float, loss: float, seed: int = 0, variant: str | None = None, method: str = "adamw") -> dict:
    return {"method": method, "multiplier": 16, "lr": lr, "seed": seed, "variant": variant, "final_val_loss": loss,
            "history": [(0, 0, 5.5), (64, 0, loss)], "diverged": False}


def test_lm_benchmark_grid_grows_while_best_on_edge_and_stops_at_divergence():
    """The LR grid doubles past a best upper edge, halves past a lower one, and never grows past a diverged LR."""
    from benchmarks.lm_large_batch import best_lr, grid_edge_step

    runs = [_lm_run(1e-3, 2.5), _lm_run(2e-3, 2.4), _lm_run(4e-3, 2.3)]
    assert grid_edge_step(runs, "adamw", 16) == 8e-3
    runs.append(_lm_run(8e-3, 2.35))
    assert grid_edge_step(runs, "adamw", 16) is None
    low = [_lm_run(1e-3, 2.2), _lm_run(2e-3, 2.4)]
    assert grid_edge_step(low, "adamw", 16) == 5e-4
    diverged = [_lm_run(1e-3, 2.5), _lm_run(2e-3, 2.4), _lm_run(4e-3, float("nan"))]
    assert grid_edge_step(diverged, "adamw", 16) is None
    # A finite final loss above the initial one is a divergence too: never the chosen LR.
    blown_up = [_lm_run(1e-3, 3e8), _lm_run(2e-3, float("nan"))]
    assert best_lr(blown_up, "adamw", 16) is None and grid_edge_step(blown_up, "adamw", 16) is None
    assert grid_edge_step([_lm_run(1e-3, 2.5)], "adamw", 16) is None  # one point has no edge


def test_lm_benchmark_variants_and_other_seeds_never_choose_the_lr():
    """best_lr/chosen read seed-0 runs without a variant; a better variant or seed 1 does not move the choice."""
    from benchmarks.lm_large_batch import best_lr, chosen

    runs = [_lm_run(1e-3, 2.5), _lm_run(2e-3, 2.4), _lm_run(1e-3, 1.0, variant="warmup25"),
            _lm_run(1e-3, 1.0, seed=1), _lm_run(2e-3, 2.45, seed=1), _lm_run(4e-3, 1.0, method="lamb")]
    assert best_lr(runs, "adamw", 16) == 2e-3
    assert [(r["lr"], r["seed"]) for r in chosen(runs, "adamw", 16)] == [(2e-3, 0), (2e-3, 1)]


def test_lm_benchmark_steps_to_reach_interpolates_between_evaluations():
    """The step at which the validation loss first reaches a target, linear between evaluation points."""
    from benchmarks.lm_large_batch import steps_to_reach

    run = {"history": [(0, 0, 5.0), (10, 0, 3.0), (20, 0, 2.0), (30, 0, 2.5)]}
    assert steps_to_reach(run, 3.0) == 10
    assert steps_to_reach(run, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(run, 1.9) is None


def test_lm_benchmark_diverging_kfac_run_is_recorded_not_raised(monkeypatch):
    """A K-FAC (MC Fisher) run whose loss turns non-finite ends as diverged instead of failing to sample labels."""
    import math

    import benchmarks.lm_large_batch as bench

    monkeypatch.setattr(bench, "MODEL", dict(bench.MODEL, d_model=16, n_heads=2, n_layers=1))
    monkeypatch.setattr(bench, "BASE_STEPS", 128)  # 8 steps at 16x
    monkeypatch.setattr(bench, "BASE_BATCH", 1)
    monkeypatch.setattr(bench, "EVALS", 2)
    train = ByteSequenceDataset(torch.tensor(list(b"abcdefgh" * 200), dtype=torch.uint8), 64)
    val = train.__getitems__([0, 1])
    record = bench.train_run("kfac", 16, 1e30, 0, train, val)
    assert record["diverged"] and math.isnan(record["final_val_loss"])
