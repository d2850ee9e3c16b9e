"""reference_impl/kvcache_analysis.py: the attention states against what the model computes, RoPE pair
lengths, grouped quantization along either axis, the stored cache, score and decode errors, the
split K/V cache, scoring caches on a model, and the capacity calculator."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from quantcourse.reference_impl import kvcache as kv
from quantcourse.reference_impl import kvcache_analysis as A


@pytest.fixture(scope="module")
def tiny():
    """A random Llama with GQA (4 query heads share 2 KV heads of 16) and 3 layers, and 2 windows of 40 tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                         intermediate_size=128, vocab_size=100, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    return model, windows


def states(B=2, H=3, T=96, D=64, seed=0, outlier_channels=()):
    x = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed))
    for c in outlier_channels:
        x[..., c] = x[..., c] * 20 + 8
    return x


# ---------------------------------------------------------------------------------------------
# What attention reads


def test_collected_states_are_what_the_model_caches_and_attends_with(tiny):
    model, windows = tiny
    cache = DynamicCache(config=model.config)
    attention_inputs = {}  # what o_proj receives: the attention output of every head, [n, T, H_q * D]
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: attention_inputs.__setitem__(i, a[0]))
             for i, layer in enumerate(model.model.layers)]  # fmt: skip
    try:
        with torch.inference_mode():
            model(windows, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    found = A.collect_attention_states(model, windows)
    assert sorted(found) == [0, 1, 2]
    for i, s in found.items():
        assert s.queries.shape == (2, 4, 40, 16) and s.keys.shape == s.values.shape == s.keys_pre_rope.shape == (2, 2, 40, 16)
        assert torch.allclose(s.keys, cache.layers[i].keys, atol=1e-6)
        assert torch.allclose(s.values, cache.layers[i].values, atol=1e-6)
        # queries, keys and the GQA head mapping together reproduce the model's attention output
        out = A.attend(s.queries, s.keys, s.values).transpose(1, 2).reshape(2, 40, 64)
        assert torch.allclose(out, attention_inputs[i], atol=1e-5)
        assert not torch.allclose(s.keys, s.keys_pre_rope, atol=1e-3)  # RoPE moved the keys
        assert torch.allclose(s.keys_pre_rope[:, :, 0], s.keys[:, :, 0], atol=1e-6)  # position 0: angle 0


def test_collection_stops_after_the_last_layer_asked_for(tiny):
    model, windows = tiny
    ran = []
    hook = model.model.layers[2].register_forward_pre_hook(lambda m, a: ran.append(True))
    head = model.lm_head.register_forward_pre_hook(lambda m, a: ran.append(True))
    try:
        found = A.collect_attention_states(model, windows[:1], layers=[1, 0])
    finally:
        hook.remove()
        head.remove()
    assert sorted(found) == [0, 1] and not ran
    with pytest.raises(ValueError, match="indices of the 3 decoder layers"):
        A.collect_attention_states(model, windows, layers=[3])


def test_pair_magnitude_is_unchanged_by_rope(tiny):
    model, windows = tiny
    s = A.collect_attention_states(model, windows, layers=[0])[0]
    assert torch.allclose(A.pair_magnitude(s.keys), A.pair_magnitude(s.keys_pre_rope), atol=1e-5)
    x = torch.tensor([3.0, 0.0, 4.0, 1.0])  # pairs (0, 2) and (1, 3)
    assert torch.allclose(A.pair_magnitude(x), torch.tensor([5.0, 1.0]))
    with pytest.raises(ValueError, match="must be even"):
        A.pair_magnitude(torch.ones(3))


def test_channel_absmax_finds_the_outlier_channel():
    x = states(outlier_channels=(5,))
    amax = A.channel_absmax(x)
    assert amax.shape == (3, 64) and (amax.argmax(dim=-1) == 5).all()
    assert torch.equal(amax, x.abs().amax(dim=0).amax(dim=1))
    ratio = A.channel_ratio(x)
    assert ratio.shape == (3 * 64,) and (ratio.view(3, 64).argmax(dim=-1) == 5).all()
    assert (ratio.view(3, 64)[:, 5] > 10).all() and torch.allclose(ratio.view(3, 64).median(dim=-1).values, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Quantizing along either axis, and the stored cache


@pytest.mark.parametrize("bits", [2, 4])
def test_group_axes_and_their_error_on_outlier_channels(bits):
    x = states(outlier_channels=(3, 40))
    per_channel = A.fake_quantize_groups(x, bits, 32, "channel")
    per_token = A.fake_quantize_groups(x, bits, 32, "token")
    transposed = kv.dequantize_groups(kv.quantize_groups(x.transpose(-1, -2).contiguous(), bits, 32)).transpose(-1, -2)
    assert torch.equal(per_channel, transposed)
    # every group's error stays within half a step of its own grid
    groups = x.transpose(-1, -2).reshape(2, 3, 64, 3, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    error = (per_channel - x).transpose(-1, -2).reshape(2, 3, 64, 3, 32).abs()
    assert (error <= step[..., None] / 2 * 1.01 + 1e-3).all()
    # a group along a token spans the outlier channels: the ordinary channels land on a coarse grid (KIVI's keys)
    ordinary = [c for c in range(64) if c not in (3, 40)]
    on_ordinary = {name: A.relative_error(x[..., ordinary], y[..., ordinary]) for name, y in
                   (("channel", per_channel), ("token", per_token))}  # fmt: skip
    assert on_ordinary["channel"] < 0.5 * on_ordinary["token"]
    with pytest.raises(ValueError, match="not a multiple of group_size 32"):
        A.fake_quantize_groups(x[..., :40, :], bits, 32, "channel")
    with pytest.raises(ValueError, match="axis must be"):
        A.fake_quantize_groups(x, bits, 32, "head")


def test_stored_is_what_the_cache_layer_returns():
    k, v = states(seed=1), states(seed=2)
    k_hat, v_hat = A.stored(k, v, "kivi2")  # G = 32, R = 128 > 96 tokens: all exact
    assert torch.equal(k_hat, k) and torch.equal(v_hat, v)
    k_long, v_long = states(T=300, seed=3), states(T=300, seed=4)
    k_hat, v_hat = A.stored(k_long, v_long, "kivi2")
    kept_keys = 300 - kv.quantized_tokens(kv.SCHEMES["kivi2"], 300)[0]  # between R and R + G - 1
    assert torch.equal(k_hat[..., -kept_keys:, :], k_long[..., -kept_keys:, :])
    assert not torch.equal(k_hat[..., -kept_keys - 1, :], k_long[..., -kept_keys - 1, :])
    assert torch.equal(v_hat[..., -128:, :], v_long[..., -128:, :])
    codes, scale = kv.quantize_int8_per_token(k)
    assert torch.equal(A.stored(k, v, "int8")[0], kv.dequantize_int8_per_token(codes, scale))
    scale = kv.fp8_scale(2 * k.abs().amax(), torch.float8_e4m3fn)  # a given scale is used, not the data's
    expected = kv.dequantize_fp8(kv.quantize_fp8(k, scale, torch.float8_e4m3fn), scale)
    assert torch.equal(A.stored(k, v, "fp8_e4m3", key_scale=scale)[0], expected)


def test_relative_error_over_all_or_some_dims():
    x = torch.ones(2, 3, 4)
    x_hat = x.clone()
    x_hat[1] += 1
    assert math.isclose(A.relative_error(x, x_hat).item(), math.sqrt(0.5), rel_tol=1e-6)
    assert torch.allclose(A.relative_error(x, x_hat, dims=(1, 2)), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# What attention makes of the errors


def test_causal_scores_and_attend_agree_with_a_direct_computation():
    q, k, v = states(H=4, T=6, D=8, seed=5), states(H=2, T=6, D=8, seed=6), states(H=2, T=6, D=8, seed=7)
    scores = A.causal_scores(q, k)
    for j in range(4):  # query head j reads KV head j // 2
        for s in range(6):
            for t in range(6):
                expected = (q[:, j, s] * k[:, j // 2, t]).sum(-1) / math.sqrt(8) if t <= s else torch.full((2,), -math.inf)
                assert torch.allclose(scores[:, j, s, t], expected, atol=1e-5)
    out = A.attend(q, k, v)
    weights = scores.softmax(dim=-1)
    assert torch.allclose(out, weights @ v.repeat_interleave(2, dim=1), atol=1e-5)
    # one query: the last position, which sees every key
    assert torch.allclose(A.attend(q[..., -1:, :], k, v), out[..., -1:, :], atol=1e-5)
    assert torch.allclose(A.attend(q[..., -3:, :], k, v), out[..., -3:, :], atol=1e-5)


def test_score_error_rms_equals_the_direct_computation():
    q, k = states(H=4, T=20, D=8, seed=11), states(H=2, T=20, D=8, seed=12)
    k_hat = k + 0.05 * states(H=2, T=20, D=8, seed=13)
    difference = A.causal_scores(q, k_hat) - A.causal_scores(q, k)
    valid = torch.isfinite(A.causal_scores(q, k))
    assert torch.allclose(A.score_error_rms(q, k, k_hat), difference[valid].square().mean().sqrt(), rtol=1e-4)
    assert A.score_error_rms(q, k, k) == 0


def test_score_error_by_channel_is_exact_for_one_channel_and_sums_to_the_mean_square():
    q, k = states(H=4, T=20, D=8, seed=8), states(H=2, T=20, D=8, seed=9)
    k_hat = k.clone()
    k_hat[..., 3] += 0.1 * torch.randn(2, 2, 20, generator=torch.Generator().manual_seed(10))
    shares = A.score_error_by_channel(q, k, k_hat)
    assert shares.shape == (8,) and (shares[[0, 1, 2, 4, 5, 6, 7]] == 0).all()
    difference = A.causal_scores(q, k_hat) - A.causal_scores(q, k)
    valid = torch.isfinite(A.causal_scores(q, k))
    assert torch.allclose(shares.sum(), difference[valid].square().mean(), rtol=1e-4)
    assert (A.score_error_by_channel(q, k, k) == 0).all()


def test_decode_error_reads_the_cache_as_it_stands_at_each_step(tiny):
    model, windows = tiny
    s = A.collect_attention_states(model, windows, layers=[1])[1]
    assert (A.decode_error(s, "fp32", [5, 39]) == 0).all()
    window = kv.KVScheme("g4r16", "grouped", 2, group_size=4, residual=16)
    errors = A.decode_error(s, window, [10, 15, 16, 39])
    assert errors[0] == 0 and errors[1] == 0  # 16 tokens or fewer: all in the window
    assert errors[2] > 0 and errors[3] > 0  # 17 tokens: the oldest value left the window
    t = 30
    k_hat, v_hat = A.stored(s.keys[..., : t + 1, :], s.values[..., : t + 1, :], "int8")
    q = s.queries[..., t : t + 1, :]
    exact = A.attend(q, s.keys[..., : t + 1, :], s.values[..., : t + 1, :])
    expected = (A.attend(q, k_hat, v_hat) - exact).norm() / exact.norm()
    assert torch.allclose(A.decode_error(s, "int8", [t]), expected[None])


def test_split_scheme_cache_stores_keys_and_values_apart(tiny):
    model, windows = tiny
    ids = windows[:1]
    with torch.inference_mode():
        same = model(ids, past_key_values=A.SplitSchemeCache(model.config, "int8", "int8"), use_cache=True).logits
        expected = model(ids, past_key_values=kv.QuantizedKVCache(model.config, "int8"), use_cache=True).logits
        split = A.SplitSchemeCache(model.config, "fp8_e4m3", "fp32", fp8_scales=torch.full((3, 2), 0.01))
        model(ids, past_key_values=split, use_cache=True)
    assert torch.equal(same, expected)
    layer = split.layers[0]
    assert layer.key_store.codes.dtype == torch.float8_e4m3fn and layer.key_store.scale == torch.tensor(0.01)
    assert layer.value_store.data.dtype == torch.float32
    # codes of 1 byte per key element plus a 4-byte scale, 4 bytes per value element
    assert layer.nbytes() == 40 * 2 * 16 * 1 + 4 + 40 * 2 * 16 * 4
    with pytest.raises(ValueError, match=r"\[3, 2\] tensor"):
        A.SplitSchemeCache(model.config, "fp8_e4m3", "fp32", fp8_scales=torch.ones(2, 2))


def test_score_caches_measures_against_the_fp32_cache(tiny):
    model, windows = tiny
    results = A.score_caches(model, windows, {
        "fp32": lambda: kv.QuantizedKVCache(model.config, "fp32"),
        "int2 without window": lambda: kv.QuantizedKVCache(model.config, kv.KVScheme("g8", "grouped", 2, group_size=8)),
    })  # fmt: skip
    assert results["fp32"]["kld"] == 0 and results["fp32"]["top1_agreement"] == 1
    assert results["fp32"]["tokens"] == 2 * 39
    assert results["fp32"]["ppl"] == results["fp32"]["reference_ppl"] == results["int2 without window"]["reference_ppl"]
    assert results["int2 without window"]["kld"] > 0


# ---------------------------------------------------------------------------------------------
# Capacity


@pytest.mark.parametrize("scheme", ["fp16", "int8", "fp8_e4m3", "kivi2", "naive4"])
@pytest.mark.parametrize("key", ["llama-3-8b", "smollm2-135m"])
def test_max_sequences_is_the_most_that_fit(key, scheme):
    config = kv.KNOWN_CONFIGS[key]
    for budget in (5e9, 64e9):
        b = A.max_sequences(config, scheme, 32768, budget)
        assert b >= 1
        assert kv.kv_cache_memory(config, scheme, 32768, b).total <= budget
        assert kv.kv_cache_memory(config, scheme, 32768, b + 1).total > budget
    assert A.max_sequences(config, scheme, 32768, 1000) == 0


def test_max_sequences_of_a_known_case():
    llama3 = kv.KNOWN_CONFIGS["llama-3-8b"]
    # fp16: 131,072 bytes per token, 4 GiB per 32k-token sequence: 16 of them in 64 GiB
    assert A.max_sequences(llama3, "fp16", 32768, 64 * 2**30) == 16
    assert A.max_sequences(llama3, "fp8_e4m3", 32768, 64 * 2**30) == 31  # 32 would need the scales' 256 bytes more
    with pytest.raises(ValueError, match="at least 1 token"):
        A.max_sequences(llama3, "fp16", 0, 1e9)
