"""LoftQ (`loraredux.init.loftq`, Li et al., arXiv 2310.08659): the alternation, its error, NF4 fixed point, PEFT.

The quantiser is bitsandbytes' NF4; every test here imports bitsandbytes directly to transcribe q_N independently.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import types

import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux.init.loftq import loftq, nf4_roundtrip
from loraredux.quant import bnb as bnb_import  # the lazy import and its log filter

bnbF = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: a second BLAS/LAPACK thread only adds contention on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- independent transcriptions -----------------------------------------------------------------------------------


def nf4_codes(X: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' NF4 codes (packed uint8) and absmax of X, flattened row-major (the blocks of a Linear4bit)."""
    codes, state = bnbF.quantize_4bit(
        X.reshape(-1).float().contiguous(), blocksize=block_size, quant_type="nf4"
    )
    return codes, state.absmax


def q_nf4(X: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """q_N(X) through bitsandbytes' quantize_4bit / dequantize_4bit, in X's dtype."""
    codes, state = bnbF.quantize_4bit(
        X.reshape(-1).float().contiguous(), blocksize=block_size, quant_type="nf4"
    )
    return bnbF.dequantize_4bit(codes, state).reshape(X.shape).to(X.dtype)


def paper_loftq(W: torch.Tensor, r: int, T: int, block_size: int = 64):
    """Algorithm 1 of the paper as written: Q_t = q_N(W - A B^T), A B^T = SVD_r(W - Q_t); returns Q_T, A B^T."""
    AB = torch.zeros_like(W)
    for _ in range(T):
        Q = q_nf4(W - AB, block_size)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        AB = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    return Q, AB


def nf4_by_definition(X: torch.Tensor, block_size: int) -> torch.Tensor:
    """QLoRA's blockwise absmax NF4 in plain torch: nearest of the 16 NormalFloat levels times the block absmax."""
    levels = bnbF.get_4bit_type("nf4", device="cpu")  # (16,) the NF4 data type of QLoRA's appendix
    flat = X.reshape(-1).float()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        absmax = block.abs().max()
        nearest = (block[:, None] / absmax - levels[None, :]).abs().argmin(dim=1)
        out[start : start + block_size] = levels[nearest] * absmax
    return out.reshape(X.shape)


def error(W: torch.Tensor, f, s: float) -> float:
    return torch.linalg.norm(W - f.base - s * f.B @ f.A).item()


def planted(out: int, inp: int, noise: float, seed: int = 0) -> torch.Tensor:
    """A rank-1 matrix plus small Gaussian noise (float64).

    Each row of u v^T is a multiple of v, so with blocks that tile the rows every block of a row normalises to the
    same pattern (up to sign): the NF4 error of u v^T has rank <= 2 and a rank-r adapter (r >= 2) absorbs it.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(out, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, inp, generator=g, dtype=torch.float64)
    return u @ v + noise * torch.randn(out, inp, generator=g, dtype=torch.float64)


# -- the alternation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("T", "s"), [(1, 1.0), (2, 0.25), (3, 2.0)])
def test_alternation_matches_the_papers_algorithm(T: int, s: float) -> None:
    torch.manual_seed(T)
    W = torch.randn(48, 96, dtype=torch.float64)  # blocks of 64 straddle rows of 96
    Q, AB = paper_loftq(W, r=4, T=T)
    f = loftq(W, 4, s, iters=T)
    torch.testing.assert_close(f.base, Q, rtol=0, atol=0)
    torch.testing.assert_close(s * f.B @ f.A, AB, rtol=1e-10, atol=1e-12)
    # the SVD split: B has orthogonal columns and A orthogonal rows with equal norms, sqrt(sigma_i / s)
    G_B, G_A = f.B.T @ f.B, f.A @ f.A.T
    torch.testing.assert_close(G_B, torch.diag(torch.diagonal(G_B)), atol=1e-10, rtol=0)
    torch.testing.assert_close(G_A, G_B, atol=1e-10, rtol=1e-10)


def test_first_alternation_quantises_w0_itself() -> None:
    W = torch.randn(32, 64, dtype=torch.float64)
    f = loftq(W, 2, 1.0, iters=1)
    torch.testing.assert_close(f.base, q_nf4(W), rtol=0, atol=0)  # A_0 = B_0 = 0


@pytest.mark.parametrize("shape", [(48, 96), (33, 64), (8, 100), (3, 32), (16, 128)])
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_quantiser_is_qloras_nf4(shape: tuple[int, int], block_size: int) -> None:
    # bitsandbytes 0.50.2's CPU dequantize_4bit gets 2-D tensors whose blocks straddle rows wrong; the flattened
    # path that nf4_roundtrip takes matches the definition on every shape.
    X = torch.randn(*shape)
    torch.testing.assert_close(
        nf4_roundtrip(X, block_size), nf4_by_definition(X, block_size), rtol=0, atol=0
    )


def test_error_falls_with_iters_and_beats_plain_quantisation() -> None:
    W = planted(64, 128, noise=0.01)
    plain = torch.linalg.norm(W - q_nf4(W)).item()
    errors = [error(W, loftq(W, 4, 0.5, iters=T), 0.5) for T in range(1, 6)]
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(errors)), errors
    assert errors[0] < 0.4 * plain  # one alternation already absorbs most of the NF4 error ...
    assert errors[-1] < 0.15 * plain  # ... and the alternation keeps improving on this W0
    # Control: on an unstructured Gaussian W0 the error is near full rank and the gain is small.
    G = torch.randn(64, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert error(G, loftq(G, 4, 0.5), 0.5) > 0.7 * torch.linalg.norm(G - q_nf4(G)).item()


# -- the base is a fixed point of NF4 -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [64, 128])
def test_base_is_an_nf4_fixed_point(dtype: torch.dtype, block_size: int) -> None:
    W = planted(32, 256, noise=0.05).to(dtype)
    T = 3
    f = loftq(W, 4, 1.0, iters=T, block_size=block_size)
    # the codes LoftQ chose at its last step, Q_T = q_N(W - s B_{T-1} A_{T-1}) (transcribed)
    _, AB = paper_loftq(W, r=4, T=T - 1, block_size=block_size)
    chosen, chosen_absmax = nf4_codes(W - AB, block_size)
    codes, absmax = nf4_codes(f.base, block_size)  # what loading the base in NF4 stores
    assert torch.equal(codes, chosen)
    torch.testing.assert_close(
        absmax, chosen_absmax, rtol=1e-6, atol=0
    )  # float32 rounding of W - AB
    torch.testing.assert_close(q_nf4(f.base, block_size), f.base, rtol=0, atol=0)
    # Negative control: with another block size the base is not representable, so the test can fail.
    assert not torch.equal(q_nf4(f.base, 32), f.base)


def test_half_precision_base_keeps_its_codes() -> None:
    W = planted(16, 128, noise=0.05).bfloat16()
    bf16 = loftq(W, 2, 1.0, iters=2)
    f32 = loftq(W.float(), 2, 1.0, iters=2)  # the same computation, kept in float32
    assert bf16.base.dtype == torch.bfloat16
    assert torch.equal(nf4_codes(bf16.base, 64)[0], nf4_codes(f32.base, 64)[0])
    assert not torch.equal(
        q_nf4(bf16.base.float()), f32.base
    )  # but the absmax is rounded to bfloat16


# -- interface ------------------------------------------------------------------------------------------------------


def test_registration_and_output() -> None:
    init = lx.init.get("loftq")
    assert (init.moves_base, init.exact, init.identity) == (True, False, False)
    assert dict(init.options) == {"bits": 4, "iters": 1, "block_size": 64}
    W = torch.randn(12, 64)
    W_copy = W.clone()
    f = init(W, 3, 2.0, iters=2)
    assert f.A.shape == (3, 64) and f.B.shape == (12, 3) and f.base.shape == (12, 64)
    assert {f.A.dtype, f.B.dtype, f.base.dtype} == {torch.float32}
    assert torch.equal(W, W_copy)  # no hidden mutation


def test_scale_only_rescales_the_factors() -> None:
    W = torch.randn(16, 64, dtype=torch.float64)
    f1, f4 = loftq(W, 3, 1.0, iters=2), loftq(W, 3, 4.0, iters=2)
    torch.testing.assert_close(f4.base, f1.base, rtol=0, atol=0)
    torch.testing.assert_close(2.0 * f4.A, f1.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(2.0 * f4.B, f1.B, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bits": 2}, "bits must be 4"),
        ({"bits": 8}, "bits must be 4"),
        ({"bits": True}, "bits must be 4"),
        ({"iters": 0}, "iters must be an integer >= 1"),
        ({"iters": -2}, "iters must be an integer >= 1"),
        ({"iters": 1.5}, "iters must be an integer >= 1"),
        ({"block_size": 48}, "block_size must be one of"),
    ],
)
def test_bad_options_are_clear_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lx.init.get("loftq")(torch.randn(8, 64), 2, 1.0, **options)


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(out, in\) = 8\]"):
        loftq(torch.randn(8, 64), 9, 1.0)
    with pytest.raises(ValueError, match="rank must be in"):
        loftq(torch.randn(8, 64), 0, 1.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        loftq(torch.randn(2, 8, 64), 2, 1.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        loftq(torch.randn(8, 64), 2, 0.0)


def test_without_bitsandbytes_the_error_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(
        ImportError, match=r"pip install bitsandbytes \(or pip install loraredux\[quant\]\)"
    ):
        loftq(torch.randn(8, 64), 2, 1.0)


def test_a_broken_bitsandbytes_install_shows_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(bnb_import.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="scipy"):
        loftq(torch.randn(8, 64), 2, 1.0)


# -- the "kernels" warning of bitsandbytes on CPU -------------------------------------------------------------------


def record(
    exc: BaseException, msg: str = bnb_import._KERNELS_MESSAGE + ": %s. Please ..."
) -> logging.LogRecord:
    return logging.LogRecord(
        bnb_import._KERNELS_LOGGER, logging.WARNING, "ops.py", 1, msg, (exc,), None
    )


def test_only_the_expected_kernels_failures_are_silenced() -> None:
    keep = bnb_import._MissingKernelsFilter().filter
    assert not keep(record(ModuleNotFoundError("No module named 'kernels'", name="kernels")))
    # kernels installed (transformers needs it) but no Hub: offline, or the publisher cannot be checked
    assert not keep(record(ConnectionError("Max retries exceeded with url: /api/organizations")))
    trust = (
        "Kernel repository 'kernels-community/x' could not verify publisher trust status. Set ..."
    )
    assert not keep(record(ValueError(trust)))
    assert keep(
        record(RuntimeError("Cannot find a build variant for this system"))
    )  # kernels there, broken
    assert keep(
        record(ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub"))
    )
    assert keep(record(ValueError("x"), msg="Some other bitsandbytes warning: %s"))


def test_the_filter_guards_the_import_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger(bnb_import._KERNELS_LOGGER)

    def importing(
        name: str,
    ) -> types.ModuleType:  # what bitsandbytes logs at import on an AVX512-BF16 CPU
        logger.warning(
            record(ModuleNotFoundError("x", name="kernels")).msg,
            ModuleNotFoundError("x", name="kernels"),
        )
        logger.warning(record(RuntimeError("x")).msg, RuntimeError("no build variant"))
        return bnbF

    monkeypatch.setattr(bnb_import.importlib, "import_module", importing)
    with caplog.at_level(logging.WARNING, logger=bnb_import._KERNELS_LOGGER):
        nf4_roundtrip(torch.ones(64))
    assert [r.getMessage().split(": ")[1] for r in caplog.records] == [
        "no build variant. Please ..."
    ]
    assert not any(isinstance(f, bnb_import._MissingKernelsFilter) for f in logger.filters)


# -- PEFT parity ----------------------------------------------------------------------------------------------------


def peft_loftq_init(monkeypatch: pytest.MonkeyPatch):
    """PEFT's `loftq_init` as shipped, run on the CPU.

    PEFT 0.22 computes on `infer_device()`, the CPU here, and quantises through
    `bnb.nn.Params4bit(..., compress_statistics=False, quant_type="nf4")` and `dequantize_4bit` on the 2-D
    weight: bitsandbytes' CPU kernels. Earlier releases hard-coded "cuda" as the compute device, so they cannot run
    here; the parity below follows PEFT 0.22 (the alternation itself did not change).
    """
    peft = pytest.importorskip("peft")
    lu = pytest.importorskip("peft.utils.loftq_utils")
    if tuple(int(p) for p in peft.__version__.split(".")[:2]) < (0, 22):
        pytest.skip(
            f"PEFT {peft.__version__} runs loftq_init on CUDA only (0.22 and later run it on the CPU)"
        )
    # accelerate's clear_device_cache runs gc.collect() every alternation: slow, and no effect on the numbers
    monkeypatch.setattr(lu, "clear_device_cache", lambda *args, **kwargs: None)
    return lu.loftq_init


@pytest.mark.parity
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("s", [1.0, 2.0])
def test_parity_with_peft_loftq_init(T: int, s: float, monkeypatch: pytest.MonkeyPatch) -> None:
    peft_loftq = peft_loftq_init(monkeypatch)
    torch.manual_seed(0)
    W = torch.randn(64, 128)  # rows tile whole blocks: PEFT's 2-D CPU dequantisation is right here
    Q, A, B = peft_loftq(W, num_bits=4, reduced_rank=4, num_iter=T)
    f = loftq(W, 4, s, iters=T)
    torch.testing.assert_close(f.base, Q, rtol=0, atol=0)
    # PEFT does not divide by s: its factors are sqrt(s) times ours (the same when alpha = r)
    torch.testing.assert_close(math.sqrt(s) * f.A, A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(math.sqrt(s) * f.B, B, rtol=1e-6, atol=1e-7)


@pytest.mark.parity
def test_parity_with_peft_init_lora_weights_loftq(monkeypatch: pytest.MonkeyPatch) -> None:
    peft = pytest.importorskip("peft")
    peft_loftq_init(monkeypatch)  # PEFT's layer calls it as shipped
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 32), nn.Tanh(), nn.Linear(32, 16))
    W0 = model[0].weight.detach().clone()
    r, alpha = 4, 8  # s = 2
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"])
    # Set after construction: LoraConfig's check for "loftq" insists on scipy, which only PEFT's removed 2-bit
    # NFQuantizer used; the bitsandbytes path that runs here does not need it.
    config.init_lora_weights = "loftq"
    config.loftq_config = vars(peft.LoftQConfig(loftq_bits=4, loftq_iter=2))
    layer = peft.get_peft_model(model, config).base_model.model[0]
    f = loftq(W0, r, alpha / r, iters=2)
    torch.testing.assert_close(f.base, layer.base_layer.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(
        math.sqrt(2.0) * f.A, layer.lora_A["default"].weight.detach(), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        math.sqrt(2.0) * f.B, layer.lora_B["default"].weight.detach(), rtol=1e-6, atol=1e-7
    )
    # with alpha != r PEFT's adapter adds s times the fit; ours adds the fit, as LoftQ intends
    peft_W = layer.get_delta_weight("default") + layer.base_layer.weight
    ours_W = f.base + (alpha / r) * f.B @ f.A
    assert torch.linalg.norm(W0 - ours_W) < torch.linalg.norm(W0 - peft_W)


@pytest.mark.parity
@pytest.mark.gpu
def test_parity_with_peft_as_shipped_on_cuda() -> None:
    lu = pytest.importorskip("peft.utils.loftq_utils")
    torch.manual_seed(0)
    W = torch.randn(48, 96)
    Q, A, B = lu.loftq_init(
        W, num_bits=4, reduced_rank=4, num_iter=1
    )  # computes on CUDA; A, B stay there
    f = loftq(W.cuda(), 4, 1.0, iters=1)
    torch.testing.assert_close(f.base.cpu(), Q, rtol=0, atol=0)
    torch.testing.assert_close((f.B @ f.A).cpu(), (B @ A).cpu(), rtol=1e-4, atol=1e-5)
    # bitsandbytes' CUDA NF4 and its (flattened) CPU NF4 agree, up to values on a rounding boundary between
    # levels (the CUDA kernel's thresholds and the CPU midpoints are separately rounded constants)
    differ = nf4_roundtrip(W.cuda()).cpu() != nf4_roundtrip(W)
    assert differ.float().mean().item() <= 1e-3
