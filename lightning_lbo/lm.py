"""A small GPT-style causal language model and the LightningModule that trains it.

:class:`GPT` is the reference transformer of the language-model benchmark: token and learned
position embeddings, ``n_layers`` pre-norm ``nn.TransformerEncoderLayer`` blocks (each one
``nn.MultiheadAttention`` with a causal mask, two ``nn.Linear`` feed-forward layers and two
``LayerNorm``), a final ``LayerNorm`` and a linear head over the vocabulary. It is built from
PyTorch's standard modules on purpose: these are the layers users' transformers are made of, so a
curvature method that covers this model covers theirs.

:class:`CausalLMModule` trains any model mapping tokens ``[N, T]`` to logits ``[N, T, V]`` with
next-token cross-entropy (the mean over all ``N * T`` positions) and logs ``val_loss`` and
``val_bpb`` (bits per byte: the loss in base 2, the usual measure of byte-level models).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.compat import PYTORCH_LIGHTNING, lightning_package, per_package, publish_per_package

OptimizerFactory = Any  # Callable[[nn.Module], anything configure_optimizers may return]


class GPT(nn.Module):
    """Decoder-only transformer: ``tokens [N, T] -> logits [N, T, vocab_size]``.

    Args:
        vocab_size: number of token ids (256 for bytes).
        seq_len: the longest sequence (size of the position embedding).
        d_model: width of the residual stream.
        n_heads: attention heads (must divide ``d_model``).
        n_layers: transformer blocks.
        d_ff: hidden width of the feed-forward layers (default ``4 * d_model``).
        dropout: dropout inside the blocks (0 in the benchmark).
        classes_last: logits ``[N, T, V]`` (default) or, with ``False``, ``[N, V, T]``, the class-second
            layout of ``F.cross_entropy``. The model declares the classes axis of its logits in
            :attr:`logits_classes_dim`, where K-FAC's MC Fisher samples its labels (either layout).
        tie_embeddings: the head uses the token embedding's weight (``head.weight =
            token_embedding.weight``, GPT-2's tying); K-FAC preconditions it with one tied block.
    """

    def __init__(self, vocab_size: int = 256, seq_len: int = 128, d_model: int = 128, n_heads: int = 4,
                 n_layers: int = 4, d_ff: int | None = None, dropout: float = 0.0, classes_last: bool = True,
                 tie_embeddings: bool = False) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("d_model", d_model),
                            ("n_heads", n_heads), ("n_layers", n_layers), ("d_ff", d_ff or 1)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; use a positive integer.")
        if d_model % n_heads:
            raise ValueError(f"Invalid n_heads: {n_heads} does not divide d_model={d_model}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout: {dropout}; use a value in [0, 1).")
        self.seq_len = seq_len
        self.classes_last = classes_last
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, d_ff or 4 * d_model, dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        if tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(seq_len),
                             persistent=False)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        # GPT-2's initialisation: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2L).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
        for block in self.blocks:
            for residual_out in (block.self_attn.out_proj, block.linear2):
                nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * n_layers))

    @property
    def logits_classes_dim(self) -> int:
        """The classes axis of the logits (``-1``: ``[N, T, V]``; ``1``: ``[N, V, T]``), for K-FAC's MC Fisher."""
        return -1 if self.classes_last else 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t = tokens.shape
        if t > self.seq_len:
            raise ValueError(f"Sequence of {t} tokens is longer than seq_len={self.seq_len}.")
        # The position embedding is *called* with [N, T] ids (not sliced): a curvature method hooking
        # nn.Embedding sees it, with the batch as the leading dimension like every other layer.
        positions = torch.arange(t, device=tokens.device).expand(n, t)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        logits = self.head(self.norm(x))
        return logits if self.classes_last else logits.transpose(1, 2)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, classes_last: bool = True) -> torch.Tensor:
    """Mean cross-entropy over all positions: ``logits [N, T, V]`` (or ``[N, V, T]``), ``targets [N, T]``."""
    return F.cross_entropy(logits.transpose(1, 2) if classes_last else logits, targets)


def _adamw(module: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


@per_package
def causal_lm_module_class(package: str) -> type:
    """The ``CausalLMModule`` class built on ``package``'s Lightning base class (one class per package)."""
    pl = lightning_package(package)

    class CausalLMModule(pl.LightningModule):
        """Next-token prediction for any ``tokens [N, T] -> logits [N, T, V]`` model.

        Args:
            model: the network; default a :class:`GPT` built with ``model_kwargs``.
            optimizer: factory called with this module in ``configure_optimizers`` (default AdamW,
                lr 1e-3, betas (0.9, 0.95), weight decay 0.1).
            model_kwargs: arguments of the default :class:`GPT`.

        Batches are ``(x, y)`` of token ids ``[N, T]`` (:class:`lightning_lbo.text.GCIDEDataModule`).

        Example::

            module = CausalLMModule(optimizer=lambda m: KFAC(m, lr=0.05, fisher="mc"))
            Trainer(max_steps=500).fit(module, datamodule=GCIDEDataModule(batch_size=32))
        """

        def __init__(self, model: nn.Module | None = None, optimizer: OptimizerFactory | None = None,
                     model_kwargs: dict[str, Any] | None = None) -> None:
            super().__init__()
            if optimizer is not None and not callable(optimizer):
                raise TypeError(f"optimizer must be a callable taking the module, got {type(optimizer).__name__}.")
            if model is not None and model_kwargs:
                raise ValueError("Give either model or model_kwargs (the arguments of the default GPT), not both.")
            self.model = model if model is not None else GPT(**(model_kwargs or {}))
            self.optimizer_factory = optimizer or _adamw

        @property
        def logits_classes_dim(self) -> int:
            """The classes axis of the logits, for K-FAC's MC Fisher: ``-1`` unless the model is class-second."""
            return -1 if getattr(self.model, "classes_last", True) else 1

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model(tokens)

        def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return next_token_loss(logits, targets, getattr(self.model, "classes_last", True))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = self.loss_fn(self(x), y)
            self.log("train_loss", loss.detach(), prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            loss = self.loss_fn(self(x), y)
            self.log("val_loss", loss, prog_bar=True, batch_size=x.shape[0])
            self.log("val_bpb", loss / math.log(2.0), batch_size=x.shape[0])

        def configure_optimizers(self) -> Any:
            return self.optimizer_factory(self)

    return publish_per_package(CausalLMModule, __name__, package)


CausalLMModule = causal_lm_module_class(PYTORCH_LIGHTNING)
