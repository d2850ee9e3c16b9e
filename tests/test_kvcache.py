"""KV-cache quantization (reference_impl/kvcache.py): the memory calculator against the models'
own shapes and against the bytes the cache really holds, the quantizers' error bounds, fp8 scale
semantics, KIVI's grouping and residual window, and the cache inside SmolLM2's generate()."""

import json

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from quantcourse.cli import main as cli_main
from quantcourse.corpus import token_windows
from quantcourse.reference_impl import kvcache as kv
from quantcourse.reference_impl.packing import pack_uint8

HF_SHAPES = {  # hidden, attention heads, KV heads, layers: the published config.json values
    "smollm2-135m": (576, 9, 3, 30),
    "llama-2-7b": (4096, 32, 32, 32),
    "llama-3-8b": (4096, 32, 8, 32),
    "llama-2-70b": (8192, 64, 8, 80),
}


def hf_config(key: str) -> LlamaConfig:
    hidden, heads, kv_heads, layers = HF_SHAPES[key]
    return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       num_hidden_layers=layers, intermediate_size=256, vocab_size=256)  # fmt: skip


def states(B=2, H=3, T=300, D=64, seed=0, outlier_channels=()):
    """Random K/V-like states [B, H, T, D]; chosen channels get 30x the magnitude (key outliers)."""
    x = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed))
    for c in outlier_channels:
        x[..., c] = x[..., c] * 30 + 10
    return x


def write(layer, x, chunks):
    """Feed x [B, H, T, D] as both K and V to a QuantizedKVLayer in chunks of the given sizes
    (cycled); return the (keys, values) that the last update handed to attention."""
    start, i = 0, 0
    while start < x.shape[-2]:
        piece = x[..., start : start + chunks[i % len(chunks)], :]
        keys, values = layer.update(piece, piece)
        start, i = start + piece.shape[-2], i + 1
    return keys, values


# ---------------------------------------------------------------------------------------------
# Memory arithmetic


@pytest.mark.parametrize("key", list(HF_SHAPES))
def test_fp16_bytes_per_token_equal_the_models_k_and_v_projection_widths(key):
    config = hf_config(key)
    assert kv.KVConfig.from_hf(config, name=kv.KNOWN_CONFIGS[key].name) == kv.KNOWN_CONFIGS[key]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # independent count: every layer caches what its k_proj and v_proj output, one number per output
    cached = sum(layer.self_attn.k_proj.out_features + layer.self_attn.v_proj.out_features for layer in model.model.layers)
    memory = kv.kv_cache_memory(kv.KNOWN_CONFIGS[key], "fp16", context=4096, batch=3)
    assert memory.total == cached * 2 * 4096 * 3 and memory.constants == memory.full_precision == 0


def test_published_per_token_figures():
    per_token = {k: kv.bytes_per_token(c, "fp16", 1) for k, c in kv.KNOWN_CONFIGS.items()}
    assert per_token == {"smollm2-135m": 23040, "llama-2-7b": 512 * 1024, "llama-3-8b": 128 * 1024, "llama-2-70b": 320 * 1024}
    # GQA: Llama-3-8B keeps 8 of 32 heads' K/V, a quarter of Llama-2-7B's cache at the same shape otherwise
    assert per_token["llama-3-8b"] * 4 == per_token["llama-2-7b"]
    # 2 million tokens of Llama-3-8B in bf16 is 262 GB, not the 32 GB a seed document claims
    assert kv.kv_cache_memory(kv.KNOWN_CONFIGS["llama-3-8b"], "fp16", 2_000_000).total == 262_144_000_000


@pytest.mark.parametrize("key", list(HF_SHAPES))
@pytest.mark.parametrize("scheme", list(kv.SCHEMES))
def test_measured_bytes_equal_the_calculator(key, scheme):
    c = kv.KNOWN_CONFIGS[key]
    layer = kv.QuantizedKVLayer(kv.SCHEMES[scheme])
    T = 203  # not a multiple of 32: a partial key group, and more than R + G tokens
    write(layer, states(B=2, H=c.kv_heads, T=T, D=c.head_dim), chunks=[50, 1, 17])
    assert layer.nbytes() * c.layers == kv.kv_cache_memory(c, scheme, T, batch=2, float_bytes=4).total


def test_quantized_tokens_follow_the_window_rule():
    kivi, naive = kv.SCHEMES["kivi2"], kv.SCHEMES["naive2"]  # G = 32, R = 128 / R = 0
    assert [kv.quantized_tokens(kivi, T) for T in (100, 128, 159, 160, 2047, 2048)] == [
        (0, 0), (0, 0), (0, 31), (32, 32), (1888, 1919), (1920, 1920)]  # fmt: skip
    assert kv.quantized_tokens(naive, 45) == (45, 45) and kv.quantized_tokens(kv.SCHEMES["kivi2_r0"], 45) == (32, 45)


def test_memory_components_at_2k_for_smollm2():
    c = kv.KNOWN_CONFIGS["smollm2-135m"]
    int8 = kv.kv_cache_memory(c, "int8", 2048)
    assert int8.codes == 2 * 30 * 3 * 2048 * 64 and int8.constants == 2 * 30 * 3 * 2048 * 4
    fp8 = kv.kv_cache_memory(c, "fp8_e4m3", 2048, batch=4)
    assert fp8.constants == 2 * 30 * 4  # one fp32 scale per layer for K and V, whatever the batch
    kivi = kv.kv_cache_memory(c, "kivi4", 2048, float_bytes=2)
    lanes = 30 * 3
    assert kivi.codes == lanes * 2 * 1920 * 64 // 2
    assert kivi.constants == lanes * (1920 // 32 * 64 + 1920 * 2) * 4  # keys per channel, values per token
    assert kivi.full_precision == lanes * 2 * 128 * 64 * 2


def test_scheme_and_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="multiple of group_size 32"):
        kv.KVScheme("bad", "grouped", 2, group_size=32, residual=100)
    with pytest.raises(ValueError, match="bits must be one of"):
        kv.KVScheme("bad", "grouped", 3)
    with pytest.raises(ValueError, match="unknown KV-cache scheme 'int3'; choose one of: fp32"):
        kv.get_scheme("int3")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        kv.KVConfig("x", 2, 3, 64, query_heads=8)
    layer = kv.QuantizedKVLayer(kv.KVScheme("g48", "grouped", 4, group_size=48))
    with pytest.raises(ValueError, match="head_dim 64 is not a multiple of group_size 48"):
        layer.update(states(T=4), states(T=4))


# ---------------------------------------------------------------------------------------------
# Quantizers


def test_int8_per_token_round_trip_and_layout():
    x = states(T=40)
    x[0, 1, 7] = 0  # an all-zero token
    codes, scale = kv.quantize_int8_per_token(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert codes.abs().max() == 127 and (codes.abs().amax(-1)[scale != 1] == 127).all()  # each token's amax -> 127
    x_hat = kv.dequantize_int8_per_token(codes, scale)
    assert ((x - x_hat).abs() <= scale[..., None] / 2 + 1e-7).all()
    assert (x_hat[0, 1, 7] == 0).all()


@pytest.mark.parametrize("dtype, top, rel", [(torch.float8_e4m3fn, 448.0, 2**-4), (torch.float8_e5m2, 57344.0, 2**-3)])
def test_fp8_scale_maps_amax_to_the_formats_maximum(dtype, top, rel):
    assert kv.fp8_max(dtype) == top
    x = states(T=64)
    scale = kv.fp8_scale(x.abs().amax(), dtype)
    codes = kv.quantize_fp8(x, scale, dtype)
    assert codes.dtype == dtype and codes.float().abs().max() == top
    x_hat = kv.dequantize_fp8(codes, scale)
    normal = x.abs() / scale >= torch.finfo(dtype).tiny  # below it the grid is uniform (subnormals)
    assert ((x_hat - x).abs()[normal] <= rel * x.abs()[normal] + 1e-12).all()
    # values above the calibrated range saturate instead of becoming inf or NaN
    late = kv.dequantize_fp8(kv.quantize_fp8(torch.tensor([5.0, -9.0]) * x.abs().amax(), scale, dtype), scale)
    assert torch.allclose(late, torch.tensor([1.0, -1.0]) * top * scale)
    assert torch.isfinite(kv.fp8_scale(0.0, dtype)) and kv.fp8_scale(0.0, dtype) > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_group_quantizer_round_trip_and_packing(bits):
    x = states(T=10) * torch.linspace(0.1, 3, 64)
    g = kv.quantize_groups(x, bits, 32)
    assert g.codes.dtype == torch.uint8 and g.codes.shape == (*x.shape[:-1], 64 * bits // 8)
    assert g.scale.dtype == g.minimum.dtype == torch.float16 and g.scale.shape == (*x.shape[:-1], 2)
    groups = x.reshape(*x.shape[:-1], 2, 32)
    torch.testing.assert_close(g.minimum.float(), groups.amin(-1), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g.scale.float(), (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1), rtol=1e-3, atol=1e-4)
    x_hat = kv.dequantize_groups(g)
    step = g.scale.float().repeat_interleave(32, dim=-1)
    assert ((x - x_hat).abs() <= step / 2 + 2e-3 * x.abs().amax()).all()  # half a step, plus fp16 constants
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(kv.pack_codes(codes, bits), pack_uint8(codes, bits))  # the course's packing layout
    assert torch.equal(kv.unpack_codes(kv.pack_codes(codes, bits), bits), codes)


# ---------------------------------------------------------------------------------------------
# KIVI: grouping and the residual window


def test_kivi_keys_are_grouped_per_channel_over_tokens_and_values_per_token():
    scheme = kv.KVScheme("k", "grouped", 4, group_size=16, residual=32)
    layer = kv.QuantizedKVLayer(scheme)
    x = states(T=100)
    write(layer, x, chunks=[7])
    keys, values = layer.key_store.quantized, layer.value_store.quantized
    tq_k, tq_v = kv.quantized_tokens(scheme, 100)
    assert (tq_k, tq_v) == (64, 68)
    assert keys.scale.shape == (2, 3, 64, tq_k // 16)  # [B, H, D channels, token groups]
    assert values.scale.shape == (2, 3, tq_v, 64 // 16)  # [B, H, tokens, channel groups]
    # key group (channel 5, tokens 16..31) and value group (token 40, channels 32..47)
    k_group, v_group = x[1, 2, 16:32, 5], x[1, 2, 40, 32:48]
    assert keys.minimum[1, 2, 5, 1].item() == pytest.approx(k_group.min().item(), abs=1e-3)
    assert values.minimum[1, 2, 40, 2].item() == pytest.approx(v_group.min().item(), abs=1e-3)
    assert keys.scale[1, 2, 5, 1].item() == pytest.approx((k_group.max() - k_group.min()).item() / 15, rel=1e-3)


@pytest.mark.parametrize("scheme", ["kivi2", "kivi4", "kivi2_r0"])
def test_the_newest_tokens_stay_exact_and_the_rest_is_quantized(scheme):
    s = kv.SCHEMES[scheme]
    x = states(T=250)
    for chunks in ([1], [250], [31, 64, 5]):
        keys, values = write(kv.QuantizedKVLayer(s), x, chunks)
        tq_k, tq_v = kv.quantized_tokens(s, 250)
        assert torch.equal(keys[..., tq_k:, :], x[..., tq_k:, :]) and torch.equal(values[..., tq_v:, :], x[..., tq_v:, :])
        assert 250 - tq_v == s.residual and s.residual <= 250 - tq_k < s.residual + s.group_size
        assert not torch.isclose(keys[..., :tq_k, :], x[..., :tq_k, :]).all()  # the older part really is quantized
        if chunks == [1]:
            first = (keys, values)
        else:  # the state after T tokens does not depend on how they were written
            assert torch.equal(keys, first[0]) and torch.equal(values, first[1])


@pytest.mark.parametrize("scheme", ["int8", "fp8_e4m3", "fp8_e5m2", "naive2", "fp16"])
def test_per_token_schemes_store_the_same_whatever_the_chunking(scheme):
    """Why chunked evaluation equals token-by-token decoding for these schemes: each token is
    quantized on its own (fp8 with its scale fixed), so what is stored does not depend on how the
    tokens arrived."""
    x = states(T=70)
    scale = torch.tensor([[0.01, 0.02]])
    reads = [write(kv.QuantizedKVLayer(kv.SCHEMES[scheme], *(scale[0] if "fp8" in scheme else (None, None))), x, chunks)
             for chunks in ([1], [70], [16, 3])]  # fmt: skip
    for keys, values in reads[1:]:
        assert torch.equal(keys, reads[0][0]) and torch.equal(values, reads[0][1])
    assert not torch.equal(reads[0][0], x)


def test_per_channel_keys_beat_per_token_keys_when_channels_have_outliers():
    x = states(T=256, outlier_channels=(3, 40))  # keys: a few channels of large magnitude
    errors = {}
    for name in ("kivi2_r0", "naive2"):
        keys, _ = write(kv.QuantizedKVLayer(kv.SCHEMES[name]), x, chunks=[32])
        normal = [c for c in range(64) if c not in (3, 40)]
        errors[name] = (keys - x)[..., normal].pow(2).mean().item()
    assert errors["kivi2_r0"] < errors["naive2"] / 10  # per-token groups spend their grid on the outliers


# ---------------------------------------------------------------------------------------------
# The cache in SmolLM2


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return token_windows(tokenizer, "heldout", 200, 1)[0]


@torch.inference_mode()
def test_fp32_cache_equals_dynamic_cache_exactly(reference, prompt):
    model = reference[0]
    dynamic, ours = DynamicCache(config=model.config), kv.QuantizedKVCache(model.config, "fp32")
    a = model(prompt[None, :150], past_key_values=dynamic, use_cache=True).logits
    b = model(prompt[None, :150], past_key_values=ours, use_cache=True).logits
    assert torch.equal(a, b)
    a = model(prompt[None, 150:151], past_key_values=dynamic, use_cache=True).logits
    b = model(prompt[None, 150:151], past_key_values=ours, use_cache=True).logits
    assert torch.equal(a, b) and ours.get_seq_length() == 151
    greedy = kv.greedy_generate(model, prompt[:64], DynamicCache(config=model.config), 12)
    assert torch.equal(kv.greedy_generate(model, prompt[:64], kv.QuantizedKVCache(model.config, "fp32"), 12), greedy)


@torch.inference_mode()
def test_int8_cache_generates_close_to_fp32(reference, prompt):
    model = reference[0]
    fp32 = kv.greedy_generate(model, prompt[:64], DynamicCache(config=model.config), 12)
    int8 = kv.greedy_generate(model, prompt[:64], kv.QuantizedKVCache(model.config, "int8"), 12)
    assert kv.generation_agreement(fp32, int8)["identical_prefix"] >= 8
    logp = torch.log_softmax(model(prompt[None, :150], use_cache=False).logits[0], -1)
    logq = torch.log_softmax(model(prompt[None, :150], past_key_values=kv.QuantizedKVCache(model.config, "int8"), use_cache=True).logits[0], -1)
    assert 0 < (logp.exp() * (logp - logq)).sum(-1).mean() < 0.01


@pytest.mark.slow
@torch.inference_mode()
def test_generate_with_every_scheme_and_measured_bytes(reference, tokenizer):
    model = reference[0]
    prompts = token_windows(tokenizer, "heldout", 170, 2)  # a batch of 2, past R + G tokens
    config = kv.KVConfig.from_hf(model.config)
    for name in kv.SCHEMES:
        cache = kv.QuantizedKVCache(model.config, name)
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), past_key_values=cache, do_sample=False,
                             max_new_tokens=6, min_new_tokens=6, pad_token_id=model.config.eos_token_id)  # fmt: skip
        assert out.shape == (2, 176)
        T = cache.get_seq_length()
        assert T == 175  # the last generated token is never fed back
        expected = kv.kv_cache_memory(config, name, T, batch=2, float_bytes=4).total
        assert cache.nbytes() == expected and cache.bytes_per_token() == expected / (2 * T)


@torch.inference_mode()
def test_score_schemes_against_the_fp32_cache(reference, prompt):
    model = reference[0]
    r = kv.score_schemes(model, prompt[None, :192], ["fp32", "int8", "naive2"], chunk_size=64)
    assert r["fp32"]["kld"] == 0 and r["fp32"]["top1_agreement"] == 1 and r["fp32"]["tokens"] == 191
    assert r["fp32"]["tokens_second_half"] == 95
    reference_ppl = torch.exp(torch.nn.functional.cross_entropy(model(prompt[None, :192]).logits[0, :-1], prompt[1:192])).item()
    assert r["fp32"]["ppl"] == pytest.approx(reference_ppl, rel=1e-5)
    assert 0 < r["int8"]["kld"] < 0.01 < r["naive2"]["kld"]
    assert r["int8"]["bytes_per_token"] == kv.bytes_per_token(kv.KNOWN_CONFIGS["smollm2-135m"], "int8", 192, 4)


@torch.inference_mode()
def test_calibrated_fp8_scales_are_amax_over_fp8_max(reference, tokenizer):
    model = reference[0]
    windows = token_windows(tokenizer, "calibration", 64, 2)
    scales = kv.fp8_scale(kv.calibrate_kv_amax(model, windows), torch.float8_e4m3fn)
    cache = DynamicCache(config=model.config)
    model(windows, past_key_values=cache, use_cache=True)
    assert scales.shape == (30, 2)
    assert scales[7, 1] * 448 == pytest.approx(cache.layers[7].values.abs().amax().item(), rel=1e-6)
    ours = kv.QuantizedKVCache(model.config, "fp8_e4m3", scales)
    model(windows[:1], past_key_values=ours, use_cache=True)
    assert ours.layers[7].value_store.scale == scales[7, 1]
    with pytest.raises(ValueError, match=r"\[30, 2\] tensor"):
        kv.QuantizedKVCache(model.config, "int8", scales)


def test_quantized_cache_refuses_cropping_and_beam_search():
    layer = kv.QuantizedKVLayer(kv.SCHEMES["kivi2"])
    layer.update(states(T=4), states(T=4))
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        layer.crop(-1)
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([1, 0]))


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_kv_memory(capsys):
    assert cli_main(["kv", "memory", "--model", "llama-3-8b", "--context", "8192", "--batch", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    fp16 = next(r for r in rows if r["scheme"] == "fp16")
    assert fp16["bytes"] == 128 * 1024 * 8192 * 4 and fp16["bytes_per_token"] == 128 * 1024
    assert {r["scheme"] for r in rows} == set(kv.SCHEMES)
    assert cli_main(["kv", "memory", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M" in out and "kivi2" in out
    with pytest.raises(SystemExit):
        cli_main(["kv", "memory", "--model", "gpt-5"])
    assert "invalid choice: 'gpt-5'" in capsys.readouterr().err


def test_cli_kv_eval(capsys):
    assert cli_main(["kv", "eval", "--scheme", "fp8_e5m2", "--context", "128", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["scheme"] == "fp8_e5m2" and row["tokens"] == 127 and row["context"] == 128
    assert abs(row["ppl"] / row["ref_ppl"] - 1) < 0.5 and 0 < row["kld"] < 1
    assert row["bytes_per_token"] == kv.bytes_per_token(kv.KNOWN_CONFIGS["smollm2-135m"], "fp8_e5m2", 128)
