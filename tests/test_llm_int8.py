"""Vector-wise int8, the LLM.int8() decomposition and the W8A8 modules, checked against
bitsandbytes (its int8 ops run on CPU) and on the real model."""

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_F
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantcourse.corpus import token_windows
from quantcourse.reference_impl.llm_int8 import (
    LLMInt8Linear,
    W8A8Linear,
    int8_matmul,
    int8_matmul_via_float32,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    llm_int8_matmul,
)
from quantcourse.surgery import replace_linears


def activations(rows: int, cols: int, outlier_cols=(), seed: int = 0) -> torch.Tensor:
    """fp16 activations ~N(0, 1), with a zero first row and columns scaled to |x| of ~20-60."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, cols, generator=g)
    X[:, list(outlier_cols)] *= 20 + 40 * torch.rand(len(outlier_cols), generator=g)
    X[0] = 0
    return X.half()


def bnb_int8_matmul(X, W, threshold, bias=None):
    """bitsandbytes' inference path (MatMul8bitLt), on CPU."""
    state = bnb.MatmulLtState()
    state.threshold, state.is_training, state.has_fp16_weights = threshold, False, True
    return bnb.matmul(X, W, state=state, bias=bias), state.idx


@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (33, 576), (300, 1536)])
@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5])
def test_vectorwise_quant_equals_bitsandbytes(shape, threshold):
    A = activations(*shape, outlier_cols=range(0, shape[1], 5))
    codes, absmax, cols = int8_vectorwise_quant(A, threshold)
    expected_codes, expected_absmax, expected_cols = bnb_F.int8_vectorwise_quant(A.clone(), threshold)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(absmax, expected_absmax) and absmax.dtype == torch.float32
    assert (cols is None) == (expected_cols is None)
    if cols is not None:
        assert torch.equal(cols, expected_cols)


def test_vectorwise_quant_of_float32_equals_bitsandbytes():
    A = activations(40, 100, outlier_cols=[3]).float() * 1.37
    for got, expected in zip(int8_vectorwise_quant(A, 6.0), bnb_F.int8_vectorwise_quant(A.clone(), 6.0), strict=True):
        assert torch.equal(got, expected)


def test_ties_round_to_even_and_zero_rows_give_zero_codes():
    A = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, 63.5], [0, 0, 0, 0, 0, 0]], dtype=torch.float16)
    codes, absmax, _ = int8_vectorwise_quant(A)
    assert codes.tolist() == [[127, 0, 2, 2, -2, 64], [0, 0, 0, 0, 0, 0]]
    assert absmax.tolist() == [127.0, 0.0]
    assert torch.equal(codes, bnb_F.int8_vectorwise_quant(A.clone())[0])


def test_outlier_values_do_not_set_the_row_scale_but_the_rest_of_their_column_does():
    A = torch.tensor([[8.0, 1.0, -0.5], [2.0, 0.5, 0.25], [9.0, 7.0, 0.0]], dtype=torch.float16)
    codes, absmax, cols = int8_vectorwise_quant(A, threshold=6.0)
    assert cols.tolist() == [0, 1]
    assert absmax.tolist() == [1.0, 2.0, 0.0]  # row 1: the 2.0 of outlier column 0 counts
    assert codes.tolist() == [[0, 0, -64], [0, 0, 16], [0, 0, 0]]
    assert torch.equal(codes, bnb_F.int8_vectorwise_quant(A.clone(), 6.0)[0])


def adversarial_int8(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every product is 16129 (K - 1) + 2: odd for even K and above 2^24 for K > 1041, so float32
    (whose integers above 2^24 are all even) cannot hold it."""
    A = torch.full((2, K), 127, dtype=torch.int8)
    B = torch.full((3, K), 127, dtype=torch.int8)
    A[:, -1], B[:, -1] = 1, 2
    return A, B


@pytest.mark.parametrize("matmul", [int8_matmul, int8_matmul_via_float32])
@pytest.mark.parametrize("M, K, N", [(1, 3, 5), (17, 576, 192), (64, 1536, 576), (8, 3000, 40)])
def test_int8_matmul_is_exact(matmul, M, K, N):
    g = torch.Generator().manual_seed(K)
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    C = matmul(A, B)
    assert C.dtype == torch.int32 and torch.equal(C.long(), A.long() @ B.long().t())


@pytest.mark.parametrize("matmul", [int8_matmul, int8_matmul_via_float32])
def test_int8_matmul_is_exact_where_a_plain_float32_matmul_is_not(matmul):
    A, B = adversarial_int8(1536)
    exact = A.long() @ B.long().t()
    assert not torch.equal((A.float() @ B.float().t()).long(), exact)
    assert torch.equal(matmul(A, B).long(), exact)


def test_mm_dequant_is_the_exact_formula_and_agrees_with_bitsandbytes():
    g = torch.Generator().manual_seed(1)
    C = torch.randint(-(2**22), 2**22, (16, 24), dtype=torch.int32, generator=g)
    rows, cols, bias = torch.rand(16, generator=g) * 50, torch.rand(24, generator=g), torch.randn(24, generator=g)
    Y = int8_mm_dequant(C, rows, cols, bias)
    exact = C.double() * rows.double()[:, None] * cols.double()[None, :] / 127**2 + bias.double()
    torch.testing.assert_close(Y.double(), exact, rtol=5e-7, atol=1e-6)
    # bnb's CPU op multiplies by 6.200124e-05 instead of 1/127^2 = 6.200012e-05: 1.8e-5 relative.
    bnb_Y = torch.ops.bitsandbytes.int8_mm_dequant(C, rows, cols, dtype=torch.float32, bias=bias)
    torch.testing.assert_close(Y, bnb_Y, rtol=3e-5, atol=1e-5)
    torch.testing.assert_close(
        int8_mm_dequant(C, rows, cols, dtype=torch.float16), bnb_F.int8_mm_dequant(C, rows, cols)
    )


def test_llm_int8_matmul_matches_bitsandbytes():
    X = activations(64, 576, outlier_cols=[3, 50, 400])
    W = (torch.randn(100, 576, generator=torch.Generator().manual_seed(2)) * 0.05).half()
    bias = torch.randn(100).half()
    expected, expected_cols = bnb_int8_matmul(X, W, 6.0, bias)
    assert expected_cols.tolist() == [3, 50, 400]
    Y = llm_int8_matmul(X, W, 6.0, bias)
    assert Y.dtype == torch.float16
    torch.testing.assert_close(Y, expected, rtol=2e-3, atol=1e-2)


def plain_vectorwise_matmul(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    X_codes, X_absmax, _ = int8_vectorwise_quant(X)
    W_codes, W_absmax, _ = int8_vectorwise_quant(W)
    return int8_mm_dequant(int8_matmul(X_codes, W_codes), X_absmax, W_absmax)


def test_the_decomposition_rescues_the_ordinary_values_from_outliers():
    X = activations(64, 256, outlier_cols=[7]).float()
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    exact = X @ W.t()
    plain_error = (plain_vectorwise_matmul(X, W) - exact).pow(2).mean()
    decomposed_error = (llm_int8_matmul(X, W) - exact).pow(2).mean()
    assert decomposed_error < plain_error / 10


def test_without_outliers_the_decomposition_is_plain_vectorwise_int8():
    X = activations(64, 256).float().clamp(-5.9, 5.9)
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(4))
    assert torch.equal(llm_int8_matmul(X, W), plain_vectorwise_matmul(X, W))


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(96, 40)


def dequantized_weight(layer) -> torch.Tensor:
    return int8_vectorwise_dequant(layer.weight_codes, layer.weight_absmax)


def test_w8a8_per_token_is_the_product_of_dequantized_tensors(linear):
    layer = W8A8Linear.from_linear(linear, act_granularity="token")
    x = activations(10, 96, outlier_cols=[5]).float().reshape(2, 5, 96)
    X_codes, X_absmax, _ = int8_vectorwise_quant(x.reshape(10, 96))
    X_hat = int8_vectorwise_dequant(X_codes, X_absmax)
    expected = (X_hat.double() @ dequantized_weight(layer).double().t() + linear.bias.double()).reshape(2, 5, 40)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_w8a8_per_tensor_uses_one_scale_for_every_token(linear):
    layer = W8A8Linear.from_linear(linear, act_granularity="tensor")
    x = activations(10, 96, outlier_cols=[5]).float()
    step = x.abs().max() / 127
    X_hat = torch.round(x / step) * step
    expected = X_hat.double() @ dequantized_weight(layer).double().t() + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)


def test_llm_int8_linear_runs_the_decomposition_and_reports_its_outliers(linear):
    layer = LLMInt8Linear.from_linear(linear, threshold=6.0)
    assert layer.last_outlier_cols is None
    x = activations(12, 96, outlier_cols=[5, 60]).float().reshape(3, 4, 96)
    y = layer(x)
    assert y.shape == (3, 4, 40)
    torch.testing.assert_close(y.reshape(12, 40), llm_int8_matmul(x.reshape(12, 96), linear.weight, 6.0, linear.bias))
    assert layer.last_outlier_cols.tolist() == [5, 60]


def test_llm_int8_linear_matches_bitsandbytes_linear8bitlt(linear):
    half = copy.deepcopy(linear).half()
    reference = bnb.nn.Linear8bitLt(96, 40, has_fp16_weights=False, threshold=6.0)
    reference.load_state_dict(half.state_dict())
    reference.eval()
    x = activations(12, 96, outlier_cols=[5, 60])
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(LLMInt8Linear.from_linear(half)(x), expected, rtol=2e-3, atol=1e-2)


def test_storage_is_int8_codes_plus_a_float32_scale_per_output_row(linear):
    for layer in (W8A8Linear.from_linear(linear), LLMInt8Linear.from_linear(linear)):
        assert layer.weight_count() == 96 * 40
        assert layer.storage_bits() == 96 * 40 * 8 + 40 * 32


def test_bad_inputs_are_explained(linear):
    with pytest.raises(TypeError, match="float tensor"):
        int8_vectorwise_quant(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN/inf"):
        int8_vectorwise_quant(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"matrix \[rows, cols\]"):
        int8_vectorwise_quant(torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        int8_vectorwise_quant(torch.ones(2, 3), threshold=-1.0)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        int8_matmul(torch.ones(2, 3, dtype=torch.int8), torch.ones(4, 5, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8 matrix"):
        int8_matmul(torch.ones(2, 3), torch.ones(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="positive"):
        llm_int8_matmul(torch.ones(2, 3), torch.ones(4, 3), threshold=0.0)
    with pytest.raises(ValueError, match="positive"):
        LLMInt8Linear.from_linear(linear, threshold=-6.0)
    with pytest.raises(ValueError, match="'token' or 'tensor'"):
        W8A8Linear.from_linear(linear, act_granularity="channel")
    with pytest.raises(ValueError, match="in_features=96"):
        W8A8Linear.from_linear(linear)(torch.ones(2, 95))


@pytest.fixture(scope="module")
def model_logits(reference):
    """Logits on one held-out window of 64 tokens: the reference's and each int8 recipe's."""
    model, tokenizer = reference
    window = token_windows(tokenizer, "heldout", length=64, count=1)
    recipes = {
        "w8a8-token": lambda name, lin: W8A8Linear.from_linear(lin, "token"),
        "w8a8-tensor": lambda name, lin: W8A8Linear.from_linear(lin, "tensor"),
        "llm.int8": lambda name, lin: LLMInt8Linear.from_linear(lin),
    }
    with torch.no_grad():
        logits = {"reference": model(window, use_cache=False).logits[0]}
        for recipe, make in recipes.items():
            quantized = copy.deepcopy(model)
            layers = replace_linears(quantized, make)
            logits[recipe] = quantized(window, use_cache=False).logits[0]
            if recipe == "llm.int8":
                logits["outliers in layer 29 down_proj"] = layers["model.layers.29.mlp.down_proj"].last_outlier_cols
            del quantized
    return logits


def kl_to_reference(logits, recipe) -> float:
    return F.kl_div(
        logits[recipe].log_softmax(-1), logits["reference"].log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()


def top1_agreement(logits, recipe) -> float:
    return (logits[recipe].argmax(-1) == logits["reference"].argmax(-1)).float().mean().item()


@pytest.mark.parametrize("recipe", ["w8a8-token", "llm.int8"])
def test_int8_recipes_keep_the_model_close_to_the_reference(model_logits, recipe):
    assert top1_agreement(model_logits, recipe) > 0.8
    assert kl_to_reference(model_logits, recipe) < 0.15


def test_per_tensor_activation_scales_lose_to_per_token_and_llm_int8_wins(model_logits):
    """SmolLM2's outliers set the one per-tensor scale, so most activations get a few codes."""
    kl = {recipe: kl_to_reference(model_logits, recipe) for recipe in ("w8a8-tensor", "w8a8-token", "llm.int8")}
    assert kl["w8a8-tensor"] > 5 * kl["w8a8-token"]
    assert top1_agreement(model_logits, "w8a8-tensor") < top1_agreement(model_logits, "w8a8-token")
    assert kl["llm.int8"] < kl["w8a8-token"], kl
    assert model_logits["outliers in layer 29 down_proj"].numel() > 50
