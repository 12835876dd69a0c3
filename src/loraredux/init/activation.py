"""Activation-based initialisers: `eva` (input PCA, rank redistribution) and `corda` (covariance-oriented SVD).

Both read the layer's input statistics gathered by `lx.init.gather(..., needs={"inputs"})`: the second moment
sum_t x_t x_t^T, the sum sum_t x_t and the row count T (`LayerData`).

    eva     A = top-r principal directions of the (centered) inputs, B = 0; ranks spread over layers by the
            explained-variance ratio (`eva_allocate`). The base is unchanged.
    corda   W0 C = U S V^T with C = E[x x^T] (damped); W0 = U S (V^T C^{-1}); the adapter takes the top-r
            ("ipm") or bottom-r ("kpm") components, the base keeps the rest: W0 == base + s B A.

The decompositions run in float32 (float64 for a float64 base); the results are cast to W0's dtype and device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .registry import Factors, LayerData, register_init

__all__ = ["corda", "eva", "eva_allocate", "eva_alpha_pattern", "explained_variance_ratio"]

_INV_TOLERANCE = 0.05  # ||C C^{-1} - I||_F accepted by the CorDA reference code and PEFT


def _work_dtype(W0: Tensor) -> torch.dtype:
    return torch.float64 if W0.dtype == torch.float64 else torch.float32


def _covariance(name: str, W0: Tensor, data: LayerData | None, centered: bool) -> Tensor:
    """(in, in) the layer's input covariance (float64, on W0's device), after checking what was gathered."""
    if data is None or data.second_moment is None or data.input_sum is None or data.rows == 0:
        raise ValueError(
            f"init {name!r} needs the layer's input statistics (LayerData.second_moment, input_sum, rows): "
            "gather them with lx.init.gather(..., needs={'inputs'}) or lx.adapt_(..., calibration=batches)"
        )
    in_features = W0.shape[1]
    if tuple(data.second_moment.shape) != (in_features, in_features):
        raise ValueError(
            f"init {name!r}: the input second moment is {tuple(data.second_moment.shape)}, expected "
            f"({in_features}, {in_features}) for a weight of shape {tuple(W0.shape)}"
        )
    C = data.covariance(centered=centered).to(device=W0.device, dtype=torch.float64)  # (in, in)
    if not torch.isfinite(C).all():
        raise ValueError(f"init {name!r}: the input statistics hold non-finite values")
    return C


def _check_rank(name: str, rank: int, limit: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"init {name!r}: rank must be an integer in [1, {limit}] ({what}), got {rank!r}"
        )


def _check_rho(rho: float) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 1.0 <= rho < float("inf"):
        raise ValueError(
            f"init 'eva': rho must be a finite number >= 1 (1 = no redistribution), got {rho!r}"
        )


def _principal(C: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigenvalues (in,) descending, clamped at 0, and eigenvectors as rows (in, in) of the symmetric C."""
    evals, evecs = torch.linalg.eigh(C.to(dtype))  # ascending
    return evals.flip(0).clamp_min(0), evecs.flip(1).T


def explained_variance_ratio(W0: Tensor, data: LayerData | None) -> Tensor:
    """(in,) the explained-variance ratios xi_i = lambda_i / tr(C) of the centered input covariance, descending.

    C = E[(x - mu)(x - mu)^T]; lambda_i are its eigenvalues. This is scikit-learn's and PEFT's
    `IncrementalPCA.explained_variance_ratio_` (S_i^2 over the total variance sum_j var_j T).

    Args:
        W0: (out, in) the layer's weight (its in-features, dtype and device are used).
        data: the layer's input statistics.

    Raises:
        ValueError: missing input statistics, or inputs without variance (a PCA is then undefined).
    """
    C = _covariance("eva", W0, data, centered=True)
    total = torch.trace(C)
    if not total > 0:
        raise ValueError(
            "init 'eva': the layer's inputs have no variance (all rows equal), so their principal directions "
            "are undefined; calibrate on more than one distinct row"
        )
    evals = torch.linalg.eigvalsh(C.to(_work_dtype(W0))).flip(0).clamp_min(0)  # (in,)
    return evals.to(torch.float64) / total


def eva_allocate(
    weights: Mapping[str, Tensor],
    data: Mapping[str, LayerData],
    rank: int,
    *,
    rho: float = 2.0,
    adjust_scaling_factors: bool = True,
) -> dict[str, int]:
    """EVA's rank redistribution: keep the L r components with the largest explained-variance ratio.

    Each layer l offers its first k_l = min(round(rho r), in_l) principal components with ratios
    xi_{l,i} = lambda_{l,i} / tr(C_l); all offers are ranked together by xi, descending, and the first L r (the
    uniform budget, L = number of layers) are kept; r_l = how many of layer l's were kept (0 <= r_l <= rho r, sum
    r_l = L r unless fewer are offered). A layer with r_l = 0 is left unadapted. Ties (layers that see the same
    input, such as q/k/v) go to the layer that comes first in `weights`, then to the lower component index.
    rho = 1 keeps every layer at r. Paischer et al., "One Initialization to Rule them All: Fine-tuning via
    Explained Variance Adaptation", arXiv 2410.07170 (the method's rank redistribution); the exact rule (cap
    round(rho r), budget = the sum of the layer ranks, ratios from the incremental PCA, ties to the layer holding
    the shared hook) is PEFT's `_get_rank_distribution` in peft/tuners/lora/eva.py, contributed by the authors.

    Args:
        weights: `{path: W0 (out, in)}` of the target layers, in model order.
        data: `{path: LayerData}` with input statistics for each of them.
        rank: r, the uniform rank the budget is based on.
        rho: the cap factor (>= 1).
        adjust_scaling_factors: not used here (see `eva_alpha_pattern`); accepted because the registry passes
            every option of the init.

    Returns:
        `{path: r_l}` for every path of `weights`.

    Raises:
        ValueError: a bad rank or rho, or a layer without usable input statistics.
    """
    _check_rho(rho)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"init 'eva': rank must be a positive integer, got {rank!r}")
    missing = [p for p in weights if p not in data]
    if missing:
        raise ValueError(f"init 'eva': no calibration data for layer(s) {missing[:5]}")
    offers: list[tuple[float, int, int]] = []  # (-xi, layer index, component index)
    for index, (path, W0) in enumerate(weights.items()):
        try:
            ratios = explained_variance_ratio(W0, data[path])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        cap = min(round(rank * rho), ratios.shape[0])
        offers.extend((-float(ratios[i]), index, i) for i in range(cap))
    offers.sort()
    paths = list(weights)
    ranks = dict.fromkeys(paths, 0)
    for _, index, _ in offers[: rank * len(paths)]:
        ranks[paths[index]] += 1
    return ranks


def eva_alpha_pattern(
    ranks: Mapping[str, int], rank: int, alpha: float, *, adjust_scaling_factors: bool = True
) -> dict[str, float]:
    """The per-layer alpha after EVA's redistribution: alpha_l = alpha r_l / r for each layer whose rank changed.

    With s = alpha / r this keeps every layer's scale at alpha / r whatever its new rank (with rsLoRA,
    s_l = alpha r_l / (r sqrt(r_l))). PEFT's `EvaConfig.adjust_scaling_factors` (default True), applied in
    `_load_eva_state_dict`: "the scaling factors are adjusted so that all LoRA gradients have the same scale
    regardless of their rank". Layers at rank 0 (unadapted) or unchanged are left out, as PEFT's alpha_pattern.

    Args:
        ranks: `{path: r_l}` from `eva_allocate`.
        rank: r.
        alpha: the config's alpha.
        adjust_scaling_factors: False gives {} (every layer keeps alpha, so s_l = alpha / r_l).
    """
    if not adjust_scaling_factors:
        return {}
    return {p: alpha * r_l / rank for p, r_l in ranks.items() if r_l not in (0, rank)}


def _sign_fix(rows: Tensor) -> Tensor:
    """Rows with their largest-magnitude entry made positive (PEFT's `svd_flip(u_based_decision=False)`)."""
    pivot = rows.abs().argmax(dim=1)  # (k,)
    signs = torch.sign(rows[torch.arange(rows.shape[0]), pivot])
    return rows * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]


@register_init("eva", needs=("inputs",), allocate=eva_allocate, alphas=eva_alpha_pattern)
def eva(
    W0: Tensor,
    rank: int,
    scale: float,
    *,
    data: LayerData | None = None,
    rho: float = 2.0,
    adjust_scaling_factors: bool = True,
) -> Factors:
    """EVA: A = the top-r principal directions of the layer's inputs, B = 0 (the base is unchanged).

    X_c = X - 1 mu^T = U S V^T (X: (T, in) the calibration inputs, mu their mean), equivalently
    C = X_c^T X_c / T = V diag(lambda) V^T; A = V_r^T (orthonormal rows), B = 0, so W' = W0 at init and the first
    gradient of B, (dL/dy)^T X V_r, collects the most input variance a rank-r A can (Paischer et al., "One
    Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation", arXiv 2410.07170, §3,
    Theorems 3.1-3.2). The centering is PEFT's: its `IncrementalPCA.partial_fit` (peft/utils/incremental_pca.py,
    after scikit-learn's) subtracts the running mean before each SVD. Signs as PEFT's `svd_flip`: each row's
    largest-magnitude entry is positive. `rank` is the layer's rank after `eva_allocate` (the registry runs it
    first); PEFT's incremental PCA converges to this exact PCA (see tests/init/test_activation.py).

    Args:
        W0: (out, in) base weight (its shape, dtype and device are used).
        rank: r_l, at most in.
        scale: s (unused: B A = 0).
        data: the layer's input statistics.
        rho: the redistribution cap, used by `eva_allocate` (>= 1; 1 = every layer keeps r).
        adjust_scaling_factors: alpha_l = alpha r_l / r for redistributed layers (PEFT's default); applied by
            the caller through `eva_alpha_pattern`, not here.

    Raises:
        ValueError: missing statistics, a bad rank or rho, or inputs without variance.
    """
    _check_rho(rho)
    out_features, in_features = W0.shape
    _check_rank("eva", rank, in_features, "the input has that many principal directions")
    C = _covariance("eva", W0, data, centered=True)
    if not torch.trace(C) > 0:
        raise ValueError(
            "init 'eva': the layer's inputs have no variance (all rows equal), so their principal directions "
            "are undefined; calibrate on more than one distinct row"
        )
    _, rows = _principal(
        C, _work_dtype(W0)
    )  # (in, in) eigenvectors as rows, by descending eigenvalue
    A = _sign_fix(rows[:rank])  # (r, in)
    B = torch.zeros(out_features, rank, dtype=W0.dtype, device=W0.device)
    return Factors(A=A.to(W0.dtype).contiguous(), B=B)


def _damped(C: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """C + d mean(diag C) I and its inverse, d = damping doubled until ||C_d C_d^{-1} - I||_F < 0.05."""
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    level = torch.diagonal(C).mean()
    if not level > 0:
        raise ValueError(
            "init 'corda': the layer's inputs are all zero, so the covariance C = E[x x^T] carries no context"
        )
    d = damping
    while True:
        C_d = C + (d * level) * eye  # (in, in)
        C_inv = torch.linalg.inv(C_d)  # (in, in); the stopping rule is defined on this inverse
        if torch.linalg.matrix_norm(C_d @ C_inv - eye) < _INV_TOLERANCE:
            return C_d, C_inv
        d *= 2


@register_init("corda", needs=("inputs",), moves_base=True)
def corda(
    W0: Tensor,
    rank: int,
    scale: float,
    *,
    data: LayerData | None = None,
    mode: str = "ipm",
    damping: float = 0.01,
) -> Factors:
    """CorDA: SVD of W0 C (C the input covariance), mapped back with C^{-1}; the adapter takes r components.

    C = E[x x^T] + d mean(diag E[x x^T]) I; W0 C = U S V^T, so W0 = U S (V^T C^{-1}) exactly. With the chosen
    index set I (|I| = r): A = diag(sqrt(S_I / s)) (V^T C^{-1})_I, B = U_I diag(sqrt(S_I / s)), base = W0 - s B A.
    "ipm" (instruction-previewed) takes the r largest singular values (the task context, trained), "kpm"
    (knowledge-preserved) the r smallest (the principal, knowledge-carrying ones stay frozen in the base).
    Yang et al., "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware
    Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv 2406.05223 (C = X X^T, uncentered; B = U_I sqrt(S_I),
    A = sqrt(S_I) (V^T C^{-1})_I, as restated in the authors' CorDA++ paper, arXiv 2506.13187). The damping
    (d = 0.01, doubled until ||C C^{-1} - I||_F < 0.05) is the authors' code (iboing/CorDA,
    cordalib/decomposition.py) and PEFT's `collect_eigens_for_layer`; the division by s is PEFT's `corda_init`.

    The scale of C: the paper writes C = X X^T (summed over the tokens); the authors' code and PEFT divide each
    forward's inputs by |max(x)| before summing X^T X and average over forwards; here C is the mean E[x x^T] over
    all calibration rows (independent of how many tokens and of how they were batched). Multiplying C by k
    leaves U, the order of S, s B A and the base unchanged and only moves the split between the factors:
    A -> A / sqrt(k), B -> B sqrt(k). For one calibration sequence of T tokens with peak m, PEFT's A is ours
    times sqrt(k) and its B ours over sqrt(k), k = m^2 / T (the parity test checks exactly that).

    Args:
        W0: (out, in) base weight.
        rank: r, at most min(out, in).
        scale: s.
        data: the layer's input statistics.
        mode: "ipm" or "kpm".
        damping: the first relative diagonal loading d (> 0).

    Raises:
        ValueError: missing statistics, a bad mode, damping or rank, or all-zero inputs.
    """
    if mode not in ("ipm", "kpm"):
        raise ValueError(
            f"init 'corda': mode must be 'ipm' (adapt the top-r components) or 'kpm' (adapt the bottom-r), "
            f"got {mode!r}"
        )
    if (
        isinstance(damping, bool)
        or not isinstance(damping, (int, float))
        or not 0 < damping < float("inf")
    ):
        raise ValueError(f"init 'corda': damping must be a finite number > 0, got {damping!r}")
    _check_rank("corda", rank, min(W0.shape), "the rank of W0 C")
    work = _work_dtype(W0)
    C_d, C_inv = _damped(_covariance("corda", W0, data, centered=False).to(work), float(damping))
    W = W0.detach().to(work)  # (out, in)
    U, S, Vh = torch.linalg.svd(W @ C_d, full_matrices=False)  # (out, k), (k,), (k, in)
    pick = slice(0, rank) if mode == "ipm" else slice(S.shape[0] - rank, S.shape[0])
    root = torch.sqrt(S[pick] / scale)  # (r,)
    A = root[:, None] * (Vh[pick] @ C_inv)  # (r, in)
    B = U[:, pick] * root[None, :]  # (out, r)
    base = W - scale * (B @ A)  # (out, in)
    return Factors(A=A.to(W0.dtype), B=B.to(W0.dtype), base=base.to(W0.dtype))
