"""English text for language-model benchmarks, offline: GCIDE (Webster's 1913 dictionary), byte level.

Debian's ``dict-gcide`` package installs the Collaborative International Dictionary of English as a
dictd database: ``gcide.dict.dz`` (a dictzip file, which any gzip reader decompresses; about 40 MB
of ASCII text) and ``gcide.index`` (one line per headword: ``word TAB offset TAB length``, offsets
and lengths in dictd's base64). :func:`read_gcide` takes every distinct entry the index points to,
in file order, skips the ``00-database-*``, ``00-gcide-*`` pseudo-entries (licence and conversion notes), and
cleans the markup:

* source tags (``[1913 Webster]``, ``[WordNet 1.5]``, ``[PJC]``) are dropped;
* pronunciations between backslashes (``\\Ca*lor"ic\\``) are dropped, cross-reference braces
  (``{Foot pound}``) are removed and their text kept;
* accent codes (``[`e]``, ``[=a]``, ``[u^]``, ``[ae]``) become their base letters;
* all runs of whitespace become one space, so an entry is one line; entries are joined by ``\\n``.

The vocabulary is the 256 byte values (no tokenizer, no unknown symbols). The held-out split is by
contiguous blocks of entries (every ``1/val_fraction``-th block of ``block_entries`` entries), so
neighbouring, near-identical entries (*Calorific*, *Calorification*) never straddle the split, and
every letter of the alphabet is in both splits.

Where the files are looked for, in order: ``data_dir``, ``$LBO_DATA_DIR``, then Debian's
``/usr/share/dictd``; ``gcide.dict.dz`` or an uncompressed ``gcide.dict`` next to ``gcide.index``.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lbo.compat import PYTORCH_LIGHTNING, lightning_package, per_package, publish_per_package
from lightning_lbo.data import DataNotFoundError, tensor_loader

DEBIAN_DICTD_DIR = Path("/usr/share/dictd")
VOCAB_SIZE = 256
HOW_TO_GET_GCIDE = (
    "GCIDE (dict-gcide) was not found. Any one of these fixes it:\n"
    "  * Debian/Ubuntu: `sudo apt-get install dict-gcide` (files in {debian}), or `make data-text`;\n"
    "  * put gcide.dict.dz (or gcide.dict) and gcide.index in a directory and pass it as data_dir "
    "(or set LBO_DATA_DIR).\n"
    "Looked in: {looked}"
)
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_SOURCE_TAG = re.compile(r"\[[^\]\n]*(?:1913 Webster|Webster 1913|WordNet|PJC|Century Dict|RDH)[^\]\n]*\]")
_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\")
_ACCENT_MARKED = re.compile(r"\[[`'=.~^\"\-*,]([a-zA-Z]{1,2})\]|\[([a-zA-Z]{1,2})[\^]\]")
_NAMED_LETTERS = {"ae": "ae", "AE": "Ae", "oe": "oe", "OE": "Oe", "imac": "i", "aum": "a", "eth": "th",
                  "thorn": "th", "asl": "a", "add": "a", "udd": "u", "ng": "ng", "th": "th", "yogh": "y",
                  "deg": " deg", "sect": "sect."}
_NAMED = re.compile(r"\[(" + "|".join(sorted(_NAMED_LETTERS, key=len, reverse=True)) + r")\]")
_WHITESPACE = re.compile(r"\s+")


def decode_dictd_number(text: str) -> int:
    """A dictd index number: base64 digits (``A`` = 0 ... ``/`` = 63), most significant first."""
    value = 0
    for char in text:
        if char not in _B64:
            raise ValueError(f"Invalid dictd base64 number: {text!r}.")
        value = value * 64 + _B64[char]
    return value


@dataclass(frozen=True)
class GCIDEFiles:
    """The dictionary text (``.dict.dz`` or ``.dict``) and its index."""

    dictionary: Path
    index: Path


def locate_gcide(data_dir: str | os.PathLike | None = None) -> GCIDEFiles:
    """Find ``gcide.dict[.dz]`` and ``gcide.index`` (search order in the module docstring)."""
    dirs = [Path(p) for p in (data_dir, os.environ.get("LBO_DATA_DIR")) if p] + [DEBIAN_DICTD_DIR]
    for directory in dirs:
        index = directory / "gcide.index"
        for name in ("gcide.dict.dz", "gcide.dict"):
            if (directory / name).is_file() and index.is_file():
                return GCIDEFiles(directory / name, index)
    raise DataNotFoundError(HOW_TO_GET_GCIDE.format(debian=DEBIAN_DICTD_DIR, looked=", ".join(map(str, dirs))))


def clean_entry(raw: str) -> str:
    """One dictionary entry as a single line of plain text (the markup rules in the module docstring)."""
    text = _SOURCE_TAG.sub("", raw)
    text = _PRONUNCIATION.sub("", text)
    text = text.replace("{", "").replace("}", "")
    text = _ACCENT_MARKED.sub(lambda m: m.group(1) or m.group(2), text)
    text = _NAMED.sub(lambda m: _NAMED_LETTERS[m.group(1)], text)
    return _WHITESPACE.sub(" ", text).strip()


def entry_spans(index: Path) -> list[tuple[int, int]]:
    """Distinct ``(offset, length)`` of the dictionary's entries in file order (pseudo-entries skipped)."""
    spans = set()
    with open(index, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or parts[0].startswith(("00-", "00database")):
                continue
            spans.add((decode_dictd_number(parts[1]), decode_dictd_number(parts[2])))
    return sorted(spans)


def read_gcide(files: GCIDEFiles, max_entries: int | None = None) -> list[str]:
    """The cleaned entries (one string each, in dictionary order); ``max_entries`` keeps the first N."""
    opener = gzip.open if files.dictionary.suffix == ".dz" else open
    with opener(files.dictionary, "rb") as fh:
        raw = fh.read()
    spans = entry_spans(files.index)
    if max_entries is not None:
        spans = spans[:max_entries]
    entries = [clean_entry(raw[start:start + length].decode("utf-8", errors="replace")) for start, length in spans]
    return [e for e in entries if e]


def split_entries(entries: list[str], val_fraction: float, block_entries: int | None = None) -> tuple[bytes, bytes]:
    """Train and held-out byte strings: every ``round(1/val_fraction)``-th block of entries is held out.

    ``block_entries`` defaults to 200 entries (about 30 KB), less for small slices so that at least two
    blocks are held out.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"Invalid val_fraction: {val_fraction}; use a value in (0, 0.5).")
    period = round(1.0 / val_fraction)
    if block_entries is None:
        block_entries = min(200, max(1, len(entries) // (2 * period)))
    if block_entries < 1:
        raise ValueError(f"Invalid block_entries: {block_entries}; use a positive integer.")
    train, val = [], []
    for b, start in enumerate(range(0, len(entries), block_entries)):
        (val if b % period == period - 1 else train).extend(entries[start:start + block_entries])
    if not val:
        raise ValueError(f"{len(entries)} entries give no held-out block of {block_entries} entries at "
                         f"val_fraction={val_fraction}; use more entries or smaller blocks.")
    return ("\n".join(train) + "\n").encode("utf-8"), ("\n".join(val) + "\n").encode("utf-8")


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    """A ``uint8`` tensor of the bytes (token ids 0..255)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_tokens(tokens: torch.Tensor) -> str:
    """Token ids back to text (invalid UTF-8 replaced)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class ByteSequenceDataset(Dataset):
    """Non-overlapping windows of a byte stream: item ``i`` is ``(x, y)``, ``y`` is ``x`` shifted by one.

    Args:
        data: ``[L]`` uint8 token stream.
        seq_len: tokens per sequence (inputs ``x``: ``[seq_len]`` int64, targets ``y``: ``[seq_len]``).
        max_sequences: keep only the first N windows (fixed validation subsets, tests).
    """

    def __init__(self, data: torch.Tensor, seq_len: int, max_sequences: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"Invalid seq_len: {seq_len}; use a positive integer.")
        if data.numel() < seq_len + 1:
            raise ValueError(f"{data.numel()} tokens are fewer than one sequence of seq_len + 1 = {seq_len + 1}.")
        self.seq_len = seq_len
        self.windows = data.unfold(0, seq_len + 1, seq_len)  # [num_windows, seq_len + 1] view
        if max_sequences is not None:
            self.windows = self.windows[:max_sequences]

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.windows[index].long()
        return w[:-1], w[1:]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.windows[torch.as_tensor(indices, dtype=torch.long)].long()
        return w[:, :-1], w[:, 1:]


def load_gcide_splits(data_dir: str | os.PathLike | None = None, val_fraction: float = 0.05,
                      max_entries: int | None = None, cache_dir: str | os.PathLike | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token streams (``uint8``), cached as two files after the first cleaning.

    ``cache_dir`` (default ``$LBO_DATA_DIR/gcide-cache`` or ``~/.cache/lightning_lbo``) keeps the
    cleaned bytes; the cache key contains the split settings and the dictionary file's size.
    """
    files = locate_gcide(data_dir)
    cache_root = Path(cache_dir or (Path(os.environ["LBO_DATA_DIR"]) / "gcide-cache" if os.environ.get("LBO_DATA_DIR")
                                    else Path.home() / ".cache" / "lightning_lbo"))
    key = f"gcide-{files.dictionary.stat().st_size}-{val_fraction}-{max_entries}"
    train_path, val_path = cache_root / f"{key}.train.bin", cache_root / f"{key}.val.bin"
    if train_path.is_file() and val_path.is_file():
        return bytes_to_tensor(train_path.read_bytes()), bytes_to_tensor(val_path.read_bytes())
    train, val = split_entries(read_gcide(files, max_entries), val_fraction)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        for path, data in ((train_path, train), (val_path, val)):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: concurrent readers never see half a file
    except OSError:
        pass  # a read-only home only costs the cleaning again next time
    return bytes_to_tensor(train), bytes_to_tensor(val)


@per_package
def gcide_datamodule_class(package: str) -> type:
    """The ``GCIDEDataModule`` class built on ``package``'s Lightning base class (one class per package)."""
    pl = lightning_package(package)

    class GCIDEDataModule(pl.LightningDataModule):
        """Byte-level GCIDE sequences for causal language modelling: batches ``(x, y)`` of ``[B, seq_len]``.

        Args:
            batch_size: per-device training batch size (sequences).
            seq_len: tokens per sequence.
            data_dir: directory to look in first (see :mod:`lightning_lbo.text`).
            val_fraction: share of entry blocks held out for validation.
            val_sequences: validation uses the first N held-out sequences (``None``: all of them).
            max_entries: use only the first N dictionary entries (tests, quick demos).
            eval_batch_size: validation batch size (defaults to ``batch_size``).
            drop_last: drop the last incomplete training batch.
            seed: seed of the shuffling.
            cache_dir: where the cleaned text is cached (see :func:`load_gcide_splits`).

        Example::

            dm = GCIDEDataModule(batch_size=32, seq_len=128)
            trainer.fit(CausalLMModule(), datamodule=dm)
        """

        vocab_size = VOCAB_SIZE

        def __init__(self, batch_size: int = 32, seq_len: int = 128, data_dir: str | None = None,
                     val_fraction: float = 0.05, val_sequences: int | None = None, max_entries: int | None = None,
                     eval_batch_size: int | None = None, drop_last: bool = True, seed: int = 0,
                     cache_dir: str | None = None) -> None:
            super().__init__()
            for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                                ("eval_batch_size", eval_batch_size or 1), ("val_sequences", val_sequences or 1),
                                ("max_entries", max_entries or 1)):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"Invalid {name}: {value!r}; use a positive integer.")
            if not 0.0 < val_fraction < 0.5:
                raise ValueError(f"Invalid val_fraction: {val_fraction}; use a value in (0, 0.5).")
            self.batch_size, self.seq_len = batch_size, seq_len
            self.eval_batch_size = eval_batch_size or batch_size
            self.data_dir, self.val_fraction, self.val_sequences = data_dir, val_fraction, val_sequences
            self.max_entries, self.drop_last, self.seed, self.cache_dir = max_entries, drop_last, seed, cache_dir
            self.train_set: ByteSequenceDataset | None = None
            self.val_set: ByteSequenceDataset | None = None

        def prepare_data(self) -> None:
            load_gcide_splits(self.data_dir, self.val_fraction, self.max_entries, self.cache_dir)

        def setup(self, stage: str | None = None) -> None:
            if self.train_set is not None:
                return
            train, val = load_gcide_splits(self.data_dir, self.val_fraction, self.max_entries, self.cache_dir)
            self.train_set = ByteSequenceDataset(train, self.seq_len)
            self.val_set = ByteSequenceDataset(val, self.seq_len, self.val_sequences)
            if self.batch_size > len(self.train_set):
                raise ValueError(f"batch_size={self.batch_size} exceeds the {len(self.train_set)} training sequences; "
                                 "lower it or use more entries.")

        def train_dataloader(self) -> DataLoader:
            return tensor_loader(self.train_set, self.batch_size, shuffle=True, drop_last=self.drop_last,
                                 generator=torch.Generator().manual_seed(self.seed))

        def val_dataloader(self) -> DataLoader:
            return tensor_loader(self.val_set, self.eval_batch_size, shuffle=False)

    return publish_per_package(GCIDEDataModule, __name__, package)


GCIDEDataModule = gcide_datamodule_class(PYTORCH_LIGHTNING)
__all__ = ["GCIDEDataModule", "ByteSequenceDataset", "load_gcide_splits", "read_gcide", "locate_gcide",
           "clean_entry", "VOCAB_SIZE"]
