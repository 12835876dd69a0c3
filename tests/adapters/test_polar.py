"""PoLAR's own identities (Lion, Zhang, Li, He, arXiv 2506.03133): ΔW = s X Θ Y^T with Stiefel factors, the landing
field and its geometry, training that keeps the factors orthonormal (with a negative control that drifts), the
stable rank, bad shapes, and an exact native save/load.

Whether PoLAR's stable rank beats LoRA's is left to the benchmarks: on small regression problems the two are within
noise of each other (sometimes one ahead, sometimes the other), so no robust test can be written at this scale.
"""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters import PoLAR, PoLARConfig
from loraredux.adapters.polar import landing_, landing_field, landing_potential, skew, stable_rank
from tiny_models import assert_same_adapter, assert_unchanged, snapshot, tiny_llama


def randomized(adapter: PoLAR, seed: int = 0) -> PoLAR:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.Theta.copy_(torch.randn(adapter.Theta.shape, generator=g, dtype=torch.float64))
    return adapter


def stiefel(n: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))[0]


def transcribed_field(X: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
    """Λ(X) = ψ(X) X + λ ∇N(X), ψ(X) = Skew(G X^T) with Skew(A) = (A - A^T) / 2, written out with (n, n) matrices."""
    A = G @ X.T
    psi = (A - A.T) / 2
    grad_N = X @ (X.T @ X - torch.eye(X.shape[1], dtype=X.dtype))
    return psi @ X + lam * grad_N


# ----------------------------------------------------------------------------------------------- the landing field


@given(n=st.integers(1, 9), data=st.data(), lam=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
def test_landing_field_is_the_formula(n, data, lam):
    p = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 10 + p)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)  # anywhere, on or off the manifold
    G = torch.randn(n, p, generator=g, dtype=torch.float64)
    torch.testing.assert_close(landing_field(X, G, lam), transcribed_field(X, G, lam))
    # ∇N is the gradient of N(X) = 1/4 ||X^T X - I||_F^2.
    X.requires_grad_(True)
    landing_potential(X).backward()
    torch.testing.assert_close(landing_field(X.detach(), torch.zeros_like(X), 1.0), X.grad)


@given(n=st.integers(1, 9), data=st.data())
def test_on_the_manifold_the_field_is_tangent(n, data):
    """For X^T X = I the normal part vanishes and X^T Λ(X) = X^T ψ(X) X is skew: Λ is in the tangent space."""
    p = data.draw(st.integers(1, n))
    X = stiefel(n, p, seed=n * 10 + p)
    G = torch.randn(n, p, generator=torch.Generator().manual_seed(p), dtype=torch.float64)
    field = landing_field(X, G, lam=1.0)
    torch.testing.assert_close(field, skew(G @ X.T) @ X)
    XtL = X.T @ field
    torch.testing.assert_close(XtL, -XtL.T, rtol=0, atol=1e-12)


@given(n=st.integers(2, 9), data=st.data())
def test_the_two_components_are_orthogonal_everywhere(n, data):
    """<ψ(X) X, ∇N(X)> = tr(ψ^T X (X^T X - I) X^T) = 0 (skew against symmetric), on or off the manifold."""
    p = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 10 + p)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    G = torch.randn(n, p, generator=g, dtype=torch.float64)
    tangent, normal = landing_field(X, G, 0.0), landing_field(X, torch.zeros_like(G), 1.0)
    assert abs((tangent * normal).sum()) <= 1e-10 * tangent.norm() * normal.norm() + 1e-12


def test_sgd_on_the_landing_field_stays_on_the_manifold_and_plain_sgd_drifts():
    """A linear loss <C, X> pushes X straight off the manifold; the landing field keeps it there."""
    X0 = stiefel(12, 4, seed=0)
    C = torch.randn(12, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    landed, plain = X0.clone(), X0.clone()
    for _ in range(400):
        landed -= 0.05 * landing_field(landed, C, lam=1.0)
        plain -= 0.05 * C
    distance = lambda X: (X.T @ X - torch.eye(4, dtype=torch.float64)).norm().item()  # noqa: E731
    assert distance(landed) < 1e-3
    assert distance(plain) > 1.0  # the negative control drifts measurably
    assert (landed * C).sum() < (X0 * C).sum() - 1.0  # and the landing run did decrease the loss


def test_low_precision_factors_are_computed_in_float32():
    X = stiefel(10, 3, seed=2)
    G = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    low = landing_field(X.bfloat16(), G.bfloat16(), 1.0)
    assert low.dtype == torch.bfloat16
    expected = transcribed_field(X.bfloat16().double(), G.bfloat16().double(), 1.0)
    torch.testing.assert_close(low.double(), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"p <= n"):
        landing_field(torch.zeros(3, 5), torch.zeros(3, 5), 1.0)
    layer = PoLAR(nn.Linear(20, 12).bfloat16(), lx.config("polar", rank=4))  # QR has no bf16 kernel
    assert layer.X.dtype == torch.bfloat16 and max(layer.orthogonality_error()) < 2e-2


# ----------------------------------------------------------------------------------------------- the layer


@given(
    n_in=st.integers(1, 10),
    n_out=st.integers(1, 10),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_update_is_scaled_X_Theta_Yt_and_fast_path_agrees_for_all_shapes(
    n_in, n_out, data, lead, bias
):
    r = data.draw(st.integers(1, min(n_in, n_out)))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(PoLAR(base, lx.config("polar", rank=r, alpha=3.0)))
    expected_W = base.weight + (3.0 / r) * a.X @ a.Theta @ a.Y.T
    torch.testing.assert_close(a.effective_weight(), expected_W, rtol=1e-12, atol=1e-12)
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    torch.testing.assert_close(
        a(x), x @ expected_W.T + (base.bias if bias else 0), rtol=1e-10, atol=1e-10
    )
    own = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert own == a.config.parameter_count(n_in, n_out) == r * (n_in + n_out) + r * r


def test_init_has_orthonormal_directions_and_a_zero_scale():
    torch.manual_seed(0)
    a = PoLAR(nn.Linear(30, 20).double(), lx.config("polar", rank=6))
    torch.testing.assert_close(a.X.T @ a.X, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(a.Y.T @ a.Y, torch.eye(6, dtype=torch.float64))
    assert a.orthogonality_error() < (1e-12, 1e-12)
    assert torch.count_nonzero(a.Theta) == 0 and PoLARConfig.identity_at_init
    assert a.scale == 16.0 / 6  # the authors' defaults: alpha = 16


def test_the_hook_replaces_factor_gradients_and_leaves_theta_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7).double())
    lx.adapt_(model, lx.config("polar", rank=3, landing_lambda=0.7), ["0"])
    a = randomized(model[0])
    with torch.no_grad():
        a.X.add_(0.1 * torch.randn_like(a.X))  # off the manifold, so the normal part is not zero
    model(torch.randn(5, 9, dtype=torch.float64)).square().sum().backward()
    raw = {n: p.grad.clone() for n, p in a.named_parameters() if p.requires_grad}
    assert landing_(model) == 1
    torch.testing.assert_close(a.X.grad, transcribed_field(a.X.detach(), raw["X"], 0.7))
    torch.testing.assert_close(a.Y.grad, transcribed_field(a.Y.detach(), raw["Y"], 0.7))
    assert torch.equal(a.Theta.grad, raw["Theta"])
    with pytest.raises(ValueError, match="no PoLAR layer"):
        landing_(nn.Sequential(nn.Linear(2, 2)))


def _regression(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12).double())
    target = copy.deepcopy(model[0])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the task: learn a rank-3 change of the weight
        target.weight += (
            torch.randn(12, 3, generator=g, dtype=torch.float64)
            @ torch.randn(3, 16, generator=g, dtype=torch.float64)
            / 4
        )
    batches = [torch.randn(32, 16, generator=g, dtype=torch.float64) for _ in range(8)]
    lx.adapt_(model, lx.config("polar", rank=4, alpha=4.0), ["0"])
    loss_fn = lambda m, x: (m(x) - target(x).detach()).square().mean()  # noqa: E731
    return model, batches, loss_fn


def test_fit_steps_along_the_landing_field_like_a_hand_written_loop():
    """`lx.train.fit` calls before_optimizer_step: its run equals a loop with `landing_` between backward and step;
    the same loop without `landing_` (the negative control) leaves the manifold measurably."""
    model, batches, loss_fn = _regression()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = lx.train.TrainConfig(steps=300, lr=0.2, schedule="constant")
    sgd = lambda params: torch.optim.SGD(params, lr=0.2)  # noqa: E731
    result = lx.train.fit(model, batches, loss_fn, config, optimizer=sgd, progress=False)
    assert result.losses[-1] < 1e-3 * result.losses[0]

    runs = {}
    for landing in (True, False):
        loop, _, _ = _regression()
        loop.load_state_dict(start)
        opt = torch.optim.SGD([p for p in loop.parameters() if p.requires_grad], lr=0.2)
        for step in range(300):
            opt.zero_grad(set_to_none=True)
            loss_fn(loop, batches[step % len(batches)]).backward()
            if landing:
                landing_(loop)
            opt.step()
        runs[landing] = loop[0]
    torch.testing.assert_close(model[0].X, runs[True].X, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model[0].Theta, runs[True].Theta, rtol=1e-9, atol=1e-12)
    assert max(model[0].orthogonality_error()) < 1e-4
    assert min(runs[False].orthogonality_error()) > 1e-2  # plain SGD drifts off St(n, r)


def test_stable_rank_of_the_layer_is_the_papers_ratio():
    torch.manual_seed(0)
    a = randomized(PoLAR(nn.Linear(14, 11).double(), lx.config("polar", rank=5)))
    with torch.no_grad():
        a.X.add_(0.2 * torch.randn_like(a.X))  # exact off the manifold too (QR of the factors)
    s = torch.linalg.svdvals(a.delta_weight().detach())
    assert a.stable_rank() == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-10)
    assert stable_rank(torch.outer(torch.arange(1.0, 5), torch.ones(3))) == pytest.approx(1.0)
    assert stable_rank(3 * stiefel(9, 4, seed=1)) == pytest.approx(4.0)  # flat spectrum: sr = rank
    assert stable_rank(torch.zeros(3, 3)) == 0.0


def test_conv1d_and_embedding_use_their_own_orientation():
    torch.manual_seed(0)
    conv = Conv1D(5, 7).double()  # weight (in=7, out=5)
    torch.nn.init.normal_(conv.bias)
    a = randomized(PoLAR(conv, lx.config("polar", rank=2)))
    x = torch.randn(3, 7, dtype=torch.float64)
    delta = a.scale * a.X @ a.Theta @ a.Y.T  # (out, in)
    torch.testing.assert_close(a(x), x @ (conv.weight + delta.T) + conv.bias)

    emb = nn.Embedding(11, 6).double()
    e = randomized(PoLAR(emb, lx.config("polar", rank=3, alpha=6.0)))
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    table = emb.weight + (2.0 * e.X @ e.Theta @ e.Y.T).T  # (num_embeddings, dim)
    torch.testing.assert_close(e(ids), table[ids], rtol=1e-12, atol=1e-12)


def test_rank_above_the_stiefel_dimension_names_the_layer_and_leaves_the_model_unchanged():
    model = tiny_llama()  # q_proj 16 -> 16, v_proj 16 -> 8
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"v_proj.*rank 9 needs r <= out = 8 \(X in St\(out, r\)\)"
    ):
        lx.adapt_(model, lx.config("polar", rank=9), ["q_proj", "v_proj"])
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="landing_lambda"):
        lx.config("polar", landing_lambda=-1.0)


def test_native_save_and_load_restore_exactly(tmp_path):
    model = lx.adapt_(tiny_llama(), lx.config("polar", rank=4), ["q_proj", "v_proj"])
    for _, a in lx.adapters(model):
        randomized(a, seed=3)
    assert lx.save_adapter(model, tmp_path) == tmp_path  # "auto": PoLAR has no PEFT form
    loaded = lx.load_adapter(tiny_llama(), tmp_path)
    assert any(k.endswith(".Theta") for k in lx.adapter_state_dict(model))
    assert_same_adapter(loaded, model)
