"""Perplexity, KL divergence, top-1 agreement, weight error and storage cost."""

import math

import pytest
import torch

from quantcourse import evaluate
from quantcourse.corpus import token_windows
from quantcourse.recipes import RecipeOptions, apply_rtn


@pytest.fixture(scope="module")
def windows(tokenizer):
    return token_windows(tokenizer, "heldout", length=64, count=3)


def test_perplexity_matches_a_straightforward_computation(reference, windows):
    """Independent check: softmax in float64, one position at a time, no log_softmax helper."""
    model = reference[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0].double()
            for t in range(len(window) - 1):
                probs = torch.exp(logits[t] - logits[t].max())
                probs = probs / probs.sum()
                total += -math.log(probs[window[t + 1]].item())
                count += 1
    assert evaluate.perplexity(model, windows, progress=False) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_reference_against_itself_scores_zero_divergence(reference, windows):
    ref = evaluate.reference_logprobs(reference[0], windows, progress=False)
    scores = evaluate.compare_to_reference(reference[0], ref, progress=False)
    assert scores.eval_tokens == 3 * 63
    assert scores.top1_agreement == 1.0
    assert abs(scores.kld) < 1e-4  # only the fp16 rounding of the stored log-probs
    assert scores.ppl == pytest.approx(scores.ref_ppl, rel=1e-5)
    assert scores.ref_ppl == pytest.approx(evaluate.perplexity(reference[0], windows, progress=False), rel=1e-5)


def test_kld_and_agreement_of_a_changed_model_match_torch(reference, fresh_model, windows):
    ref = evaluate.reference_logprobs(fresh_model, windows, progress=False)
    apply_rtn(fresh_model, RecipeOptions(bits=3), progress=False)
    scores = evaluate.compare_to_reference(fresh_model, ref, progress=False)
    kld, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for window in windows:
            logp = torch.log_softmax(reference[0](window[None]).logits[0, :-1].double(), -1)
            logq = torch.log_softmax(fresh_model(window[None]).logits[0, :-1].double(), -1)
            kld += torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
            count += len(window) - 1
    assert scores.kld > 0.01
    assert scores.kld == pytest.approx(kld / count, rel=1e-3)
    assert scores.top1_agreement == pytest.approx(agree / count, abs=1 / count)
    assert scores.ppl > scores.ref_ppl


def test_reference_logprobs_refuse_a_model_not_from_the_loader(windows):
    with pytest.raises(ValueError, match="load_reference_model"):
        evaluate.reference_logprobs(torch.nn.Linear(2, 2), windows)


def test_weight_error_on_a_known_example():
    w = torch.tensor([[3.0, 4.0]])
    error = evaluate.weight_error(w, torch.tensor([[3.0, 3.0]]))
    assert error.mse == 0.5
    assert error.relative_error == pytest.approx(1 / 5)
    assert error.sqnr_db == pytest.approx(10 * math.log10(25))
    assert error.max_abs_error == 1.0
    assert evaluate.weight_error(w, w).sqnr_db == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate.weight_error(w, w.T)


@pytest.mark.parametrize(
    "bits, group_size, symmetric, expected",
    [
        (4, 64, True, 4 + 16 / 64),  # fp16 scale per 64 weights
        (4, 64, False, 4 + (16 + 4) / 64),  # plus a 4-bit zero point
        (3, 32, False, 3 + (16 + 3) / 32),
        # per output row: 5184 rows over the 7 layers of a block, 3,538,944 weights
        (8, None, True, 8 + 16 * 5184 / 3_538_944),
    ],
)
def test_bits_per_weight_counts_scales_and_zeros(fresh_model, bits, group_size, symmetric, expected):
    # one decoder layer is enough for the count, and much faster to quantize
    fresh_model.model.layers = fresh_model.model.layers[:1]
    apply_rtn(fresh_model, RecipeOptions(bits=bits, group_size=group_size, symmetric=symmetric), progress=False)
    assert evaluate.model_bits_per_weight(fresh_model) == pytest.approx(expected)


def test_unquantized_model_costs_its_float_width(reference):
    assert evaluate.model_bits_per_weight(reference[0]) == 32
