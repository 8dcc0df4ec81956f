"""Numerical robustness of the K-FAC inverse methods over randomized damped factors (issue 26, item 11).

Every method of :mod:`lightning_lbo.optim.kfac.inverses` (Cholesky, eigen, Woodbury low-rank, unit-wise
2x2, diagonal/embedding) is run through the production entry point, :func:`invert_with_fallback` (its
``from_factors`` and fallback ladder) with the storage dtype of the method's own policy
(``storage_dtype(damping, factor dtype)``), then ``apply(grad, damping)`` on an fp32 gradient, over
randomized cases:

* spectra: log-uniform eigenvalues with condition number ``cond`` from 1 to 1e12, rank-deficient (zero
  eigenvalues), repeated eigenvalues (one or two distinct values), a tight cluster (``1 + 1e-9 x``
  noise); a random orthogonal basis; Woodbury factors as ``U^T U / n`` with ``r < d / 2`` rows (some
  with all-zero columns: conv taps that only read padding);
* scales: the norms of ``A`` and ``G`` independently log-uniform in 1e-8..1e8, the gradient's in
  1e-4..1e4, the damping log-uniform in 1e-8..1;
* factor dtypes: ``fp64``, ``fp32`` (the fp64 factor rounded to fp32), ``bf16`` (a factor reduced in
  bf16 over two ranks, as ``TorchDistributedCommunicator(reduce_dtype=torch.bfloat16)``: two shares
  rounded to bf16 and summed in fp32).

Reference: a float64 dense solve of the whole damped system the method stands for, built from the
factors the method received (so the reduction's own rounding is not counted as inversion error) and
projected onto PSD matrices (eigenvalues clamped at 0, what the methods and the ladder promise for a
factor that is PSD up to rounding): ``(G + delta_G I) (x) (A + delta_A I)`` with
``delta_A = pi sqrt(lambda)``, ``delta_G = sqrt(lambda) / pi`` (Cholesky, Woodbury),
``G (x) A + lambda I`` (eigen, diagonal), ``F_u + lambda I`` per unit (unit-wise).

Bound (first-order perturbation theory of a linear solve): a backward-stable solve in unit roundoff
``u`` has relative error ``<= c u kappa``, ``kappa`` the condition number of the damped system; a
method that inverts the received factor without projecting it (Cholesky, Woodbury and unit-wise when
their factorisation succeeds) solves a system off by ``E = M_raw - M_ref``, which adds
``||E|| / lambda_min(M_ref)`` (``rho``; 0 for a PSD factor); the result is returned in the fp32 of the
gradient (``u32``). So ``err <= C (u kappa + rho) + 2 u32``, ``u`` the machine epsilon of the dtype
the inverse is stored and applied in. ``C`` is stated per method and factor dtype in
:data:`BOUND_C`, fixed from the a-priori estimate ``c ~ n`` (``n`` the system size, at most 144
here) before the sweep and checked by it; the table gives the measured worst ``err / (u kappa + rho
+ 2 u32 / C)`` so the margin is visible.

Counted per method and dtype: exceptions, non-finite outputs, cases above the bound, cases that fell
back down the ladder (fp64 retry, PSD projection, more damping) or to the identity.

Usage::

    python benchmarks/inverse_robustness.py --cases 10000 --seed 0 --out benchmarks/results/inverse_robustness.txt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from lightning_lbo.optim.kfac import inverses as inv  # noqa: E402
from lightning_lbo.optim.kfac.factors import LowRankFactor  # noqa: E402

METHODS = ("cholesky", "eigen", "woodbury", "unit_wise", "diagonal")
FACTOR_DTYPES = ("fp64", "fp32", "bf16")
SPECTRA = ("log_uniform", "rank_deficient", "repeated", "clustered")
CLASSES = {"cholesky": inv.CholeskyKronecker, "eigen": inv.EigenKronecker, "woodbury": inv.WoodburyKronecker,
           "unit_wise": inv.UnitWise, "diagonal": inv.DiagonalKronecker}
FACTORED = ("cholesky", "woodbury")  # factored Tikhonov damping; the others add lambda to the eigenvalues
#: C of the bound ``err <= C (u kappa + rho) + 2 u32``: a-priori ``c ~ n`` with n <= 144 the system size
BOUND_C = 200.0
U32 = torch.finfo(torch.float32).eps


class _Named:
    """A stand-in for a block in ``invert_with_fallback``'s jobs (only its name is read)."""

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass
class Outcome:
    method: str
    factor_dtype: str
    spectrum: str
    error: float = math.nan  # relative error against the dense fp64 solve
    bound_terms: float = math.nan  # u kappa + rho (so that err <= C bound_terms + 2 u32)
    kappa: float = math.nan
    rho: float = 0.0
    storage: str = ""
    exception: str | None = None
    finite: bool = True
    fell_to_identity: bool = False
    notes: dict = field(default_factory=dict)

    @property
    def bound(self) -> float:
        return BOUND_C * self.bound_terms + 2 * U32

    @property
    def within(self) -> bool:
        return self.exception is None and self.finite and self.error <= self.bound


# ------------------------------------------------------------------------------------------------ cases
def _log_uniform(gen: torch.Generator, lo: float, hi: float, size=()) -> torch.Tensor:
    return 10 ** (math.log10(lo) + (math.log10(hi) - math.log10(lo)) * torch.rand(size, generator=gen,
                                                                                   dtype=torch.float64))


def _orthogonal(gen: torch.Generator, d: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(d, dtype=torch.float64))


def eigenvalues(gen: torch.Generator, d: int, spectrum: str, cond: float, scale: float) -> torch.Tensor:
    """``d`` non-negative eigenvalues, the largest ``scale``, of the given kind (fp64)."""
    if spectrum == "log_uniform":
        ev = _log_uniform(gen, scale / cond, scale, (d,))
        ev[0] = scale
        if d > 1:
            ev[-1] = scale / cond
    elif spectrum == "rank_deficient":
        rank = int(torch.randint(0, d, (), generator=gen))  # 0 .. d-1 nonzero eigenvalues
        ev = torch.zeros(d, dtype=torch.float64)
        if rank:
            ev[:rank] = _log_uniform(gen, scale / cond, scale, (rank,))
            ev[0] = scale
    elif spectrum == "repeated":
        values = torch.tensor([scale, scale / cond], dtype=torch.float64)
        ev = values[torch.randint(0, 2, (d,), generator=gen)]
        ev[0] = scale
    else:  # clustered: all within 1e-9 of each other (eigh's hardest case for the eigenvectors)
        ev = scale * (1 + 1e-9 * torch.randn(d, generator=gen, dtype=torch.float64)).abs()
    return ev[torch.randperm(d, generator=gen)]


def psd_factor(gen: torch.Generator, d: int, spectrum: str, cond: float, scale: float) -> torch.Tensor:
    q = _orthogonal(gen, d)
    m = (q * eigenvalues(gen, d, spectrum, cond, scale)) @ q.T
    return 0.5 * (m + m.T)


def low_rank_rows(gen: torch.Generator, d: int, spectrum: str, cond: float, scale: float
                  ) -> tuple[torch.Tensor, int]:
    """Rows ``U: [r, d]`` (``r < d / 2``, ``d >= 3``) and ``n`` with ``U^T U / n`` of the given spectrum on
    ``r`` directions; sometimes with all-zero columns (the used-columns path)."""
    r = int(torch.randint(1, (d - 1) // 2 + 1, (), generator=gen))
    n = int(torch.randint(r, 4 * r + 1, (), generator=gen))
    used = d
    if d >= 4 and bool(torch.rand((), generator=gen) < 0.3):
        used = max(r, int(0.75 * d) - int(torch.randint(0, d // 4 + 1, (), generator=gen)))
    cols = torch.randperm(d, generator=gen)[:used]
    basis = _orthogonal(gen, used)[:, :r]  # [used, r]
    ev = eigenvalues(gen, r, spectrum if spectrum != "rank_deficient" else "log_uniform", cond, scale)
    if spectrum == "rank_deficient" and r > 1:
        ev[int(torch.randint(0, r, (), generator=gen))] = 0.0  # a zero row direction: r rows of rank r - 1
    U = torch.zeros(r, d, dtype=torch.float64)
    U[:, cols] = (basis * (n * ev).sqrt()).T
    return U, n


def received(factor: torch.Tensor, factor_dtype: str, gen: torch.Generator) -> torch.Tensor:
    """The factor as the method receives it: fp64, rounded to fp32, or reduced in bf16 over two ranks."""
    if factor_dtype == "fp64":
        return factor.clone()
    if factor_dtype == "fp32":
        return factor.to(torch.float32)
    share = 0.2 + 0.6 * float(torch.rand((), generator=gen))
    return (factor * share).to(torch.bfloat16).to(torch.float32) + \
        (factor * (1 - share)).to(torch.bfloat16).to(torch.float32)


# ------------------------------------------------------------------------------------------------ reference
def _project(m64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, q = torch.linalg.eigh(m64)
    return (q * d.clamp_min(0)) @ q.T, d


def _negative_ratio(m64: torch.Tensor) -> float:
    """The smallest eigenvalue over the largest magnitude (how far from PSD the rounding left a factor)."""
    d = torch.linalg.eigvalsh(m64)
    top = float(d.abs().max())
    return float(d[0]) / top if top > 0 else 0.0


def _pi(a64: torch.Tensor, g64: torch.Tensor) -> float:
    pi = math.sqrt((a64.trace().item() / a64.shape[0]) / (g64.trace().item() / g64.shape[0])) \
        if g64.trace().item() != 0 else math.inf
    return pi if math.isfinite(pi) and pi > 0 else 1.0


def dense_systems(method: str, a64: torch.Tensor | None, g64: torch.Tensor | None, damping: float,
                  units: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(M_ref, M_raw, lambda_min, lambda_max)``: the damped system on the PSD projections of the received
    factors, the same on the received factors themselves (row-major ``vec``: ``(G (x) A) vec(X) = vec(G X A)``),
    and ``M_ref``'s extreme eigenvalues from the factors' own (a dense ``eigvalsh`` of ``M_ref`` cannot resolve
    a smallest eigenvalue 1e-16 below its largest)."""
    if method == "unit_wise":
        blocks_ref, blocks_raw, lo, hi = [], [], math.inf, 0.0
        for f in units:
            eye = torch.eye(f.shape[0], dtype=torch.float64)
            projected, ev = _project(f)
            blocks_ref.append(projected + damping * eye)
            blocks_raw.append(f + damping * eye)
            ev = ev.clamp_min(0) + damping
            lo, hi = min(lo, float(ev.min())), max(hi, float(ev.max()))
        return torch.block_diag(*blocks_ref), torch.block_diag(*blocks_raw), lo, hi
    (pa, ev_a), (pg, ev_g) = _project(a64), _project(g64)
    ev_a, ev_g = ev_a.clamp_min(0), ev_g.clamp_min(0)
    eye_a, eye_g = torch.eye(a64.shape[0], dtype=torch.float64), torch.eye(g64.shape[0], dtype=torch.float64)
    if method in FACTORED:
        pi, root = _pi(a64, g64), damping ** 0.5
        lo = float((ev_g.min() + root / pi) * (ev_a.min() + pi * root))
        hi = float((ev_g.max() + root / pi) * (ev_a.max() + pi * root))
        return (torch.kron(pg + root / pi * eye_g, pa + pi * root * eye_a),
                torch.kron(g64 + root / pi * eye_g, a64 + pi * root * eye_a), lo, hi)
    eye = torch.eye(a64.shape[0] * g64.shape[0], dtype=torch.float64)
    lo, hi = float(ev_g.min() * ev_a.min()) + damping, float(ev_g.max() * ev_a.max()) + damping
    return torch.kron(pg, pa) + damping * eye, torch.kron(g64, a64) + damping * eye, lo, hi


# ------------------------------------------------------------------------------------------------ one case
def run_case(gen: torch.Generator, method: str | None = None, factor_dtype: str | None = None) -> Outcome:
    method = method or METHODS[int(torch.randint(0, len(METHODS), (), generator=gen))]
    factor_dtype = factor_dtype or FACTOR_DTYPES[int(torch.randint(0, len(FACTOR_DTYPES), (), generator=gen))]
    spectrum = SPECTRA[int(torch.randint(0, len(SPECTRA), (), generator=gen))]
    cond = float(_log_uniform(gen, 1.0, 1e12))
    scale_a, scale_g = float(_log_uniform(gen, 1e-8, 1e8)), float(_log_uniform(gen, 1e-8, 1e8))
    damping = float(_log_uniform(gen, 1e-8, 1.0))
    grad_scale = float(_log_uniform(gen, 1e-4, 1e4))
    out = Outcome(method, factor_dtype, spectrum)
    recv_dtype = torch.float64 if factor_dtype == "fp64" else torch.float32
    units = None
    if method == "unit_wise":
        k, count = int(torch.randint(1, 3, (), generator=gen)), int(torch.randint(1, 17, (), generator=gen))
        true = torch.stack([psd_factor(gen, k, spectrum, cond, float(_log_uniform(gen, 1e-8, 1e8)))
                            for _ in range(count)])
        F = received(true, factor_dtype, gen)
        factors = {"F": F}
        units = F.double()
        grad = grad_scale * torch.randn(count, k, generator=gen)
    elif method == "woodbury":
        d_a, d_g = int(torch.randint(3, 17, (), generator=gen)), int(torch.randint(1, 9, (), generator=gen))
        U, n = low_rank_rows(gen, d_a, spectrum, cond, scale_a)
        rows = received(U, factor_dtype, gen)
        a64 = rows.double().T @ rows.double() / n  # the dense factor of exactly the rows the method receives
        # low-rank sides are LowRankFactor objects (rows and count beside the dense value), as the blocks hand them
        factors = {"A": LowRankFactor(rows.unsqueeze(0), n, a64.to(recv_dtype).unsqueeze(0))}
        if d_g >= 3 and bool(torch.rand((), generator=gen) < 0.3):  # G low-rank too
            V, g_n = low_rank_rows(gen, d_g, spectrum, cond, scale_g)
            g_rows = received(V, factor_dtype, gen)
            g64 = g_rows.double().T @ g_rows.double() / g_n
            factors["G"] = LowRankFactor(g_rows.unsqueeze(0), g_n, g64.to(recv_dtype).unsqueeze(0))
        else:
            G = received(psd_factor(gen, d_g, spectrum, cond, scale_g), factor_dtype, gen)
            g64 = G.double()
            factors["G"] = G.unsqueeze(0)
        grad = grad_scale * torch.randn(1, d_g, d_a, generator=gen)
    else:
        d_a, d_g = int(torch.randint(1, 13, (), generator=gen)), int(torch.randint(1, 13, (), generator=gen))
        G = received(psd_factor(gen, d_g, spectrum, cond, scale_g), factor_dtype, gen)
        if method == "diagonal":  # an embedding's A: the token counts' diagonal
            a_diag = received(eigenvalues(gen, d_a, spectrum, cond, scale_a), factor_dtype, gen)
            factors = {"A": a_diag.unsqueeze(0), "G": G.unsqueeze(0)}
            a64 = torch.diag(a_diag.double())
        else:
            A = received(psd_factor(gen, d_a, spectrum, cond, scale_a), factor_dtype, gen)
            factors = {"A": A.unsqueeze(0), "G": G.unsqueeze(0)}
            a64 = A.double()
        g64 = G.double()
        grad = grad_scale * torch.randn(1, d_g, d_a, generator=gen)
    cls = CLASSES[method]
    storage = cls.storage_dtype(damping, recv_dtype)
    out.storage = "fp64" if storage == torch.float64 else "fp32"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (inverse,), failed = inv.invert_with_fallback([(_Named("block"), cls, factors, damping, storage)])
            got = inverse.apply(grad, damping)
        out.fell_to_identity = bool(failed) or any("plain gradient" in str(w.message) for w in caught)
    except Exception as exc:  # counted, never raised: the sweep reports them
        out.exception = f"{type(exc).__name__}: {exc}"[:200]
        return out
    out.finite = bool(torch.isfinite(got).all())
    M_ref, M_raw, lam_min, lam_max = dense_systems(method, None if method == "unit_wise" else a64,
                                                   None if method == "unit_wise" else g64, damping, units)
    want = torch.linalg.solve(M_ref, grad.double().reshape(-1))
    out.kappa = lam_max / lam_min
    received_factors = list(units) if method == "unit_wise" else [a64, g64]
    out.notes["negative"] = min(_negative_ratio(f) for f in received_factors)
    # eigen and diagonal clamp the received factors' eigenvalues (the projection itself); the others invert the
    # received factor unless their ladder had to project it
    projects = method in ("eigen", "diagonal")
    out.rho = 0.0 if projects else float(torch.linalg.matrix_norm(M_raw - M_ref, ord=2)) / lam_min
    u = torch.finfo(storage).eps
    out.bound_terms = u * out.kappa + out.rho
    denom = float(want.norm())
    out.error = float((got.double().reshape(-1) - want).norm()) / denom if denom > 0 else float(got.double().norm())
    if not out.finite:
        out.error = math.inf
    return out


def sweep(cases: int, seed: int, progress: bool = False) -> list[Outcome]:
    gen = torch.Generator().manual_seed(seed)
    outcomes = []
    for i in range(cases):
        outcomes.append(run_case(gen))
        if progress and (i + 1) % 1000 == 0:
            print(f"{i + 1} cases", flush=True)
    return outcomes


# ------------------------------------------------------------------------------------------------ report
def table(outcomes: list[Outcome]) -> str:
    """Per method and factor dtype: the counts, the errors, and the worst error against the bound."""
    lines = ["| method | factor dtype | cases | exceptions | non-finite | to identity | above bound "
             "| worst err / bound | median rel. err | worst rel. err, bound < 1e-2 (cases) | worst rel. err, all |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for dtype in FACTOR_DTYPES:
            rows = [o for o in outcomes if o.method == method and o.factor_dtype == dtype]
            if not rows:
                continue
            ok = [o for o in rows if o.exception is None and o.finite]
            errors = sorted(o.error for o in ok)
            tight = [o.error for o in ok if o.bound < 1e-2]
            lines.append(f"| {method} | {dtype} | {len(rows)} | {sum(o.exception is not None for o in rows)} | "
                         f"{sum(not o.finite for o in rows)} | {sum(o.fell_to_identity for o in rows)} | "
                         f"{sum(not o.within for o in rows)} | {max(o.error / o.bound for o in ok):.2g} | "
                         f"{errors[len(errors) // 2]:.1e} | {max(tight, default=math.nan):.1e} ({len(tight)}) | "
                         f"{errors[-1]:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the table (and the failing cases) to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    outcomes = sweep(args.cases, args.seed, progress=True)
    wall = time.perf_counter() - start
    bad = [o for o in outcomes if not o.within]
    text = [f"K-FAC inverse robustness: {args.cases} randomized damped cases, seed {args.seed}, torch "
            f"{torch.__version__}, 1 thread, {wall:.0f} s.",
            f"Bound: rel. error <= C (u kappa + rho) + 2 u32, C = {BOUND_C:g}, u = eps of the storage dtype.",
            "", table(outcomes), "",
            f"Totals: {sum(o.exception is not None for o in outcomes)} exceptions, "
            f"{sum(not o.finite for o in outcomes)} non-finite outputs, {len(bad)} above the bound, "
            f"{sum(o.fell_to_identity for o in outcomes)} fell back to the identity.",
            "Most negative eigenvalue of a received factor, over its largest: " + ", ".join(
                f"{d} {min((o.notes.get('negative', 0.0) for o in outcomes if o.factor_dtype == d), default=0.0):.2g}"
                for d in FACTOR_DTYPES) + " (the ladder projects down to -inverses.ROUNDING_TOLERANCE = "
            f"-{inv.ROUNDING_TOLERANCE:g})."]
    for o in bad[:20]:
        text.append(f"  above bound: {o.method} {o.factor_dtype} {o.spectrum} storage {o.storage}: err {o.error:.3g}, "
                    f"kappa {o.kappa:.3g}, rho {o.rho:.3g}, bound {o.bound:.3g}, identity {o.fell_to_identity}, "
                    f"{o.exception or ''}")
    report = "\n".join(text)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
