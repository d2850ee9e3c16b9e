"""reference_impl/nf4_analysis.py: code books, occupancy, normal-model probabilities, QQ points,
kurtosis, blockwise quantization with any table, and the Lloyd-Max table."""

import math

import pytest
import torch

from quantcourse.reference_impl import nf4
from quantcourse.reference_impl.formats import NF4_OFFSET, build_nf4_codebook
from quantcourse.reference_impl.nf4_analysis import (
    CODE_BOOK_NAMES,
    code_book,
    code_cells,
    code_occupancy,
    excess_kurtosis,
    fake_quantize_code_book,
    int4_code_book,
    lloyd_max,
    lloyd_max_code_book,
    nf4_sigma,
    normal_bin_probabilities,
    normal_qq,
    occupancy_entropy,
)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_code_books_are_sorted_distinct_and_in_the_absmax_frame():
    sizes = {"nf4": 16, "fp4": 15, "int4": 15}
    for name in CODE_BOOK_NAMES:
        code = code_book(name)
        assert code.dtype == torch.float32 and code.numel() == sizes[name], name
        assert bool((code.diff() > 0).all()) and code.min() == -1 and code.max() == 1, name
        assert (code == 0).sum() == 1, f"{name} must hold an exact zero once"
    assert torch.equal(code_book("nf4"), nf4.nf4_code_book())
    assert torch.equal(code_book("fp4"), torch.unique(nf4.fp4_code_book()))
    assert torch.allclose(int4_code_book() * 7, torch.arange(-7.0, 8.0))
    with pytest.raises(ValueError, match="nf4, fp4, int4"):
        code_book("int8")


def test_nf4_values_are_quantiles_of_a_normal_with_sigma_from_the_offset():
    sigma = nf4_sigma()
    assert sigma == pytest.approx(1 / 1.848, rel=2e-3)
    positive = code_book("nf4")[8:]
    p = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double()
    assert torch.allclose(positive.double(), (sigma * torch.special.ndtri(p)).flip(0), atol=1e-6)
    assert nf4_sigma(0.99) < sigma  # an offset further out puts +-1 further into the tail
    with pytest.raises(ValueError, match="between 0.5 and 1"):
        nf4_sigma(1.0)


def test_normal_bin_probabilities_sum_to_one_and_are_nearly_flat_only_for_nf4():
    sigma = nf4_sigma()
    for name in CODE_BOOK_NAMES:
        p = normal_bin_probabilities(code_book(name), sigma)
        assert p.sum().item() == pytest.approx(1, abs=1e-12) and bool((p > 0).all())
    nf4_p = normal_bin_probabilities(code_book("nf4"), sigma)
    int4_p = normal_bin_probabilities(code_book("int4"), sigma)
    assert bool(((nf4_p - 1 / 16).abs() < 0.01).all()), nf4_p
    assert occupancy_entropy(nf4_p) > 3.99 > occupancy_entropy(int4_p) + 0.1
    # the direct integral of one cell, by hand
    code = code_book("int4").double()
    lo, hi = (code[6] + code[7]) / 2, (code[7] + code[8]) / 2
    expected = torch.special.ndtr(hi / 0.3) - torch.special.ndtr(lo / 0.3)
    assert normal_bin_probabilities(code_book("int4"), 0.3)[7].item() == pytest.approx(expected.item(), rel=1e-12)


def test_occupancy_counts_nearest_values_with_ties_going_down():
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([-0.9, -0.5, -0.49, 0.1, 0.25, 0.26, 0.8, 1.0])
    assert code_cells(x, code).tolist() == [0, 0, 1, 1, 1, 2, 3, 3]
    assert code_occupancy(x, code).tolist() == [2 / 8, 3 / 8, 1 / 8, 2 / 8]
    with pytest.raises(ValueError, match="sorted ascending"):
        code_occupancy(x, code.flip(0))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        code_occupancy(x, code * 2)


def test_occupancy_of_normal_samples_matches_the_normal_model():
    sigma = nf4_sigma()
    x = (torch.randn(400_000, generator=generator()) * sigma).clamp(-1, 1)
    for name in CODE_BOOK_NAMES:
        measured = code_occupancy(x, code_book(name))
        assert measured.sum().item() == pytest.approx(1)
        assert torch.allclose(measured, normal_bin_probabilities(code_book(name), sigma), atol=2e-3), name


def test_entropy():
    assert occupancy_entropy(torch.full((16,), 1 / 16)) == pytest.approx(4)
    assert occupancy_entropy(torch.tensor([1.0, 0.0, 0.0])) == 0
    assert occupancy_entropy(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="sum to 1"):
        occupancy_entropy(torch.tensor([0.5, 0.25]))


def test_normal_qq_lies_on_the_diagonal_for_normal_data_and_bends_for_heavy_tails():
    normal = torch.randn(200_000, generator=generator(1)) * 3 + 5  # standardization removes scale and shift
    theoretical, sample = normal_qq(normal, points=101)
    assert theoretical.shape == sample.shape == (101,)
    assert torch.allclose(theoretical, -theoretical.flip(0), atol=1e-12)
    assert (sample - theoretical).abs().max() < 0.05
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    _, tails = normal_qq(laplace, points=101)
    assert tails[-1] > theoretical[-1] + 0.3 and tails[0] < theoretical[0] - 0.3
    with pytest.raises(ValueError, match="not all equal"):
        normal_qq(torch.ones(10))


def test_excess_kurtosis_of_known_distributions():
    g = generator(2)
    assert excess_kurtosis(torch.randn(400_000, generator=g)) == pytest.approx(0, abs=0.05)
    assert excess_kurtosis(torch.rand(400_000, generator=g)) == pytest.approx(-1.2, abs=0.02)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((400_000,))
    assert excess_kurtosis(laplace) == pytest.approx(3, abs=0.3)
    with pytest.raises(ValueError, match="constant"):
        excess_kurtosis(torch.zeros(5))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, blocksize", [((96, 64), 64), ((33, 7), 32), ((3000,), 128), ((5, 1031), 256)])
def test_fake_quantize_code_book_is_bitsandbytes_scheme(quant_type, double_quant, shape, blocksize):
    w = torch.randn(shape, generator=generator(3)) * 0.05
    packed, state = nf4.quantize_4bit(w, blocksize, quant_type, compress_statistics=double_quant)
    expected = nf4.dequantize_4bit(packed, state)
    table = nf4.nf4_code_book() if quant_type == "nf4" else nf4.fp4_code_book()
    assert torch.equal(fake_quantize_code_book(w, table, blocksize, double_quant), expected)


def test_fake_quantize_int4_table_is_int4_absmax():
    w = torch.randn(256, 384, generator=generator(4)) * 0.05
    ours, affine = fake_quantize_code_book(w, int4_code_book(), 64), nf4.int4_absmax(w, 64)
    step = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True) / 7
    differ = (ours - affine).reshape(-1, 64).abs()
    # the two round x/absmax and x/(absmax/7) in float32: they may disagree on a value within a
    # rounding error of a midpoint, and then by one step
    assert (differ > 1e-6).float().mean() < 1e-4
    assert bool((differ <= step * 1.0001).all())


def test_double_quant_changes_only_the_absmax_and_only_a_little():
    w = torch.randn(512, 256, generator=generator(5)) * 0.05
    single = fake_quantize_code_book(w, code_book("nf4"), 64)
    double = fake_quantize_code_book(w, code_book("nf4"), 64, double_quant=True)
    ratio = (double / single)[single != 0].reshape(-1)
    assert not torch.equal(single, double)
    assert (ratio - 1).abs().max() < 0.02  # each block is rescaled by its absmax's relative error
    assert torch.equal(single == 0, double == 0)


def test_fake_quantize_errors():
    with pytest.raises(ValueError, match="blocksize"):
        fake_quantize_code_book(torch.randn(64), code_book("nf4"), 48)
    with pytest.raises(TypeError, match="code values"):
        fake_quantize_code_book(torch.randn(64), [0.0, 1.0], 64)
    with pytest.raises(TypeError, match="float tensor"):
        fake_quantize_code_book(torch.arange(64), code_book("nf4"), 64)


def test_lloyd_max_on_uniform_data_is_the_uniform_quantizer():
    x = torch.rand(400_000, generator=generator(6)) * 2 - 1
    values = lloyd_max(x, levels=8)
    expected = -1 + (2 * torch.arange(8) + 1) / 8
    assert torch.allclose(values, expected, atol=5e-3)


def test_lloyd_max_finds_clusters_and_respects_weights():
    x = torch.tensor([-0.5] * 10 + [0.5] * 10 + [0.6] * 10)
    assert torch.allclose(lloyd_max(x, levels=2), torch.tensor([-0.5, 0.55]), atol=1e-3)
    weights = torch.tensor([1.0] * 20 + [3.0] * 10)
    assert torch.allclose(lloyd_max(x, weights, levels=2), torch.tensor([-0.5, 0.575]), atol=1e-3)
    with pytest.raises(ValueError, match="fewer than 4"):
        lloyd_max(x, levels=4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        lloyd_max(x * 3, levels=2)


def test_lloyd_max_satisfies_the_centroid_condition_and_beats_nf4_in_mse():
    w = torch.randn(384, 384, generator=generator(7)) * 0.05
    table = lloyd_max_code_book(w, 64)
    assert table.shape == (16,) and bool((table.diff() > 0).all())
    scaled, absmax = nf4.scale_blocks(w.reshape(-1), 64)
    weights = absmax.double().pow(2).repeat_interleave(64)
    cells = code_cells(scaled, table)
    for j in range(16):  # each value is the weighted mean of its cell (up to the grid summary)
        inside = cells == j
        centroid = (scaled.double()[inside] * weights[inside]).sum() / weights[inside].sum()
        assert table[j].item() == pytest.approx(centroid.item(), abs=5e-4)
    mse = {name: (fake_quantize_code_book(w, t, 64) - w).pow(2).mean().item()
           for name, t in (("lloyd", table), ("nf4", code_book("nf4")), ("int4", code_book("int4")))}  # fmt: skip
    assert mse["lloyd"] < mse["nf4"] < mse["int4"], mse
    # and no offset of the NF4 construction reaches it
    for offset in (0.93, 0.95, 0.97, 0.99):
        nf4_like = (fake_quantize_code_book(w, build_nf4_codebook(offset), 64) - w).pow(2).mean().item()
        assert mse["lloyd"] < nf4_like
    assert math.isfinite(mse["lloyd"])
