"""Which block preconditions which module: a registry, built explicitly, and the traversal of a model.

:func:`default_block_types` is the built-in map; the module-global :data:`BLOCK_TYPES` starts as a copy of
it and is what :func:`register_block` extends for every preconditioner built afterwards. One
preconditioner can be given its own map instead (``KFACPreconditioner(..., block_types={MyLayer: MyBlock})``,
merged over the global one), which touches no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lightning_lbo.optim.kfac.blocks.attention import MultiheadAttentionBlock
from lightning_lbo.optim.kfac.blocks.base import CurvatureBlock
from lightning_lbo.optim.kfac.blocks.conv import Conv1dBlock, Conv2dBlock
from lightning_lbo.optim.kfac.blocks.embedding import EmbeddingBlock
from lightning_lbo.optim.kfac.blocks.linear import EXPAND, LinearBlock, LinearVariant
from lightning_lbo.optim.kfac.blocks.tied import TiedEmbeddingBlock
from lightning_lbo.optim.kfac.blocks.unitwise import UnitWiseBlock

BlockFactory = Callable[..., CurvatureBlock]
SharedBlockFactory = Callable[[CurvatureBlock, CurvatureBlock], "CurvatureBlock | None"]


def default_block_types() -> dict[type[nn.Module], type[CurvatureBlock]]:
    """The built-in module type -> block class map (a new dict)."""
    return {nn.Linear: LinearBlock, nn.Conv1d: Conv1dBlock, nn.Conv2d: Conv2dBlock, nn.Embedding: EmbeddingBlock,
            nn.BatchNorm1d: UnitWiseBlock, nn.BatchNorm2d: UnitWiseBlock, nn.BatchNorm3d: UnitWiseBlock,
            nn.LayerNorm: UnitWiseBlock, nn.MultiheadAttention: MultiheadAttentionBlock}


#: Module type -> block class. Looked up along the module's MRO, so subclasses of a registered type
#: (e.g. a custom ``nn.Linear``) get its block unless registered themselves.
BLOCK_TYPES: dict[type[nn.Module], type[CurvatureBlock]] = default_block_types()

#: Factories of the block of a weight shared by two layers: ``factory(first_block, second_block)`` returns
#: the block, or ``None`` for a pair it does not cover (tied embeddings: :mod:`.tied`).
SHARED_BLOCK_FACTORIES: list[SharedBlockFactory] = [TiedEmbeddingBlock.from_blocks]


def _check_pair(module_type: object, block_type: object) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_block needs an nn.Module subclass, got {module_type!r}.")
    if not (isinstance(block_type, type) and issubclass(block_type, CurvatureBlock)):
        raise TypeError(f"register_block needs a CurvatureBlock subclass, got {block_type!r}.")


def register_block(module_type: type[nn.Module], block_type: type[CurvatureBlock]) -> None:
    """Precondition every ``module_type`` (and subclasses not registered themselves) with ``block_type``, in
    every preconditioner built afterwards (for one preconditioner: its ``block_types=`` argument).

    The preconditioner builds ``block_type(module, name, factor_dtype=...)`` (a :class:`LinearBlock`
    subclass also gets ``linear_variant=...``).

    Example::

        register_block(MyLinear, LinearBlock)
    """
    _check_pair(module_type, block_type)
    BLOCK_TYPES[module_type] = block_type


def register_shared_block(factory: SharedBlockFactory) -> None:
    """Cover a sharing pattern: ``factory(first, second)`` builds one block for two blocks that share a
    parameter (``first`` found first in ``named_modules``), or returns ``None``. Uncovered pairs get the
    plain update with a warning."""
    if not callable(factory):
        raise TypeError(f"register_shared_block needs a callable (first, second) -> block or None, got {factory!r}.")
    SHARED_BLOCK_FACTORIES.append(factory)


class BlockRegistry:
    """A module type -> block class map and the shared-parameter factories, for one preconditioner."""

    def __init__(self, types: Mapping[type[nn.Module], type[CurvatureBlock]] | None = None,
                 shared: Iterable[SharedBlockFactory] | None = None) -> None:
        types = dict(BLOCK_TYPES if types is None else types)
        for module_type, block_type in types.items():
            _check_pair(module_type, block_type)
        self.types = types
        self.shared = list(SHARED_BLOCK_FACTORIES if shared is None else shared)

    @classmethod
    def with_overrides(cls, block_types: Mapping[type[nn.Module], type[CurvatureBlock]] | None) -> BlockRegistry:
        """The global registry (as it is now) with ``block_types`` taking precedence."""
        return cls({**BLOCK_TYPES, **(block_types or {})})

    def block_type_for(self, module: nn.Module) -> type[CurvatureBlock] | None:
        """The block class of ``module`` (nearest registered base class), else ``None``."""
        for cls in type(module).__mro__:
            if cls in self.types:
                return self.types[cls]
        return None

    def make_block(self, module: nn.Module, name: str, factor_dtype: torch.dtype = torch.float32,
                   linear_variant: str | LinearVariant = EXPAND) -> CurvatureBlock | None:
        """The block of a registered module with trainable parameters, else ``None``."""
        block_type = self.block_type_for(module)
        if block_type is None or not block_type.trainable(module):
            return None
        if issubclass(block_type, LinearBlock):
            return block_type(module, name, factor_dtype=factor_dtype, linear_variant=linear_variant)
        return block_type(module, name, factor_dtype=factor_dtype)

    def make_shared_block(self, first: CurvatureBlock, second: CurvatureBlock) -> CurvatureBlock | None:
        """The block of a parameter shared by ``first`` and ``second``, else ``None``."""
        for factory in self.shared:
            block = factory(first, second)
            if block is not None:
                return block
        return None


def block_type_for(module: nn.Module) -> type[CurvatureBlock] | None:
    """The globally registered block class of ``module``, else ``None``."""
    return BlockRegistry().block_type_for(module)


def make_block(module: nn.Module, name: str, factor_dtype: torch.dtype = torch.float32,
               linear_variant: str | LinearVariant = EXPAND) -> CurvatureBlock | None:
    """The block of ``module`` from the global registry, else ``None``."""
    return BlockRegistry().make_block(module, name, factor_dtype, linear_variant)


def make_shared_block(first: CurvatureBlock, second: CurvatureBlock) -> CurvatureBlock | None:
    return BlockRegistry().make_shared_block(first, second)


def find_blocks(module: nn.Module, registry: BlockRegistry, *, exclude: Iterable[nn.Module | str | type] = (),
                params: Iterable[torch.Tensor] | None = None, factor_dtype: torch.dtype = torch.float32,
                linear_variant: str | LinearVariant = EXPAND) -> tuple[list[CurvatureBlock], list[str]]:
    """The blocks of ``module``'s supported layers, and a description of each layer with trainable parameters
    left to the plain update (a pure function of the model: no hooks, no state).

    Only layers whose parameters are all in ``params`` (default: all) and require grad get a block (a partly
    frozen layer gets none: its frozen parameter has no gradient to precondition). ``exclude`` holds modules,
    their qualified names or module types; one not in ``module`` raises ``ValueError``. A block
    that owns its submodules' parameters (``nn.MultiheadAttention``'s ``out_proj``) covers them; a parameter of
    two layers gets one block for both from the registry's shared factories (tied embeddings), or none.
    """
    allowed = None if params is None else {id(p) for p in params}
    exclude = tuple(exclude)
    excluded_types = tuple(t for t in exclude if isinstance(t, type))
    named = dict(module.named_modules())
    ids = {id(sub) for sub in named.values()}
    unknown = [e for e in exclude if (isinstance(e, str) and e not in named)
               or (isinstance(e, nn.Module) and id(e) not in ids)]
    if unknown:
        shown = [e if isinstance(e, str) else type(e).__name__ + " (a module not in the model)" for e in unknown]
        raise ValueError(f"exclude lists {shown}, not in {type(module).__name__}: exclude that model's own "
                         f"modules or their qualified names ({', '.join(repr(n) for n in list(named)[1:8])}, ...).")
    excluded_modules = [named[e] if isinstance(e, str) else e for e in exclude if not isinstance(e, type)]
    excluded = {id(sub) for m in excluded_modules for sub in m.modules()}
    # nn.MultiheadAttention uses out_proj's weight without calling out_proj: its own hooks would never fire
    attention_out = {id(m.out_proj): m for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    blocks: list[CurvatureBlock] = []
    unsupported: list[str] = []
    seen: dict[int, str] = {}
    inside: set[int] = set()
    for name, sub in module.named_modules():
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        skip = id(sub) in excluded or id(sub) in inside or (excluded_types and isinstance(sub, excluded_types))
        if not own or skip:
            continue
        if allowed is not None and not all(id(p) in allowed for p in own):
            continue
        label = name or "<root>"
        parent = attention_out.get(id(sub))
        if parent is not None:  # its attention layer got no block (excluded or unsupported): nor does out_proj
            if not (id(parent) in excluded or (excluded_types and isinstance(parent, excluded_types))):
                unsupported.append(f"{label} ({type(sub).__name__}, used by its MultiheadAttention without a "
                                   "forward call)")
            continue
        block = registry.make_block(sub, name or type(sub).__name__, factor_dtype, linear_variant)
        if block is None or not {id(p) for p in own} <= {id(p) for p in block.params}:
            unsupported.append(f"{label} ({type(sub).__name__})")
            continue
        if not all(p.requires_grad for p in block.params):
            # K-FAC preconditions a layer's parameters jointly: one without a gradient leaves nothing to apply
            frozen = [n for n, p in (("weight", block.weight), ("bias", block.bias))
                      if p is not None and not p.requires_grad]
            unsupported.append(f"{label} ({type(sub).__name__}, frozen {' and '.join(frozen) or 'parameters'})")
            continue
        children = {id(p) for p in block.params} - {id(p) for p in own}
        inside.update(id(m) for m in sub.modules() if m is not sub and
                      {id(p) for p in m.parameters(recurse=False)} <= children)
        shared = [seen[id(p)] for p in block.params if id(p) in seen]
        if shared:
            other = next(b for b in blocks if b.name == shared[0])
            blocks = [b for b in blocks if b is not other]
            block = registry.make_shared_block(other, block)
            if block is None:
                unsupported.append(f"{label} ({type(sub).__name__}, shares a parameter with {shared[0]})")
                continue
        seen.update({id(p): block.name for p in block.params})
        blocks.append(block)
    return blocks, unsupported
