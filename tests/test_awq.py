"""AWQ (reference_impl/awq.py): candidate scales and their normalisation, duo scaling, the scale
search on problems whose answer is known, folding (exact on a real SmolLM2 layer), the clipping
search, the grouped-query skip, equality with an independent transcription of llm-awq's loop, the
driver, export through the W4A16 path, the 1%-salient-channels experiment, and bad inputs."""

import copy
import os
from collections import defaultdict

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the W4A16 kernel runs on CPU

import pytest
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantcourse.corpus import token_windows
from quantcourse.kernels.common import interpreting
from quantcourse.reference_impl import awq
from quantcourse.reference_impl.affine import AffineSpec, fake_quantize, quantize_tensor
from quantcourse.reference_impl.awq import (
    AWQOptions,
    KeptChannelsLinear,
    activation_mean,
    awq_layer,
    awq_model,
    candidate_scales,
    clip_objective,
    clip_search,
    fold_problem,
    fold_scales,
    keep_channels_model,
    quantized_linear,
    salient_channels,
    search_scales,
    weight_mean,
)
from quantcourse.reference_impl.gptq import GPTQLinear, GPTQOptions, load_gptq, save_gptq
from quantcourse.reference_impl.w4a16 import W4A16Linear
from quantcourse.surgery import first_layer_inputs, set_module


def spec(bits=4, group_size=32, symmetric=False):
    granularity = "group" if group_size else "channel"
    return AffineSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)


def salient_problem(K=64, N=48, tokens=256, salient=(5,), boost=30.0, seed=0):
    """A Linear [N, K] whose input channels `salient` are `boost` times larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
    x = torch.randn(4, tokens // 4, K, generator=g)
    x[..., list(salient)] *= boost
    return linear, x


def tiny_llama(kv_heads, layers=2, seed=0):
    """A random 2-layer Llama: hidden 64, 4 heads, `kv_heads` KV heads (4: MHA, 2: GQA)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_windows(n=4, L=32, seed=1):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Statistics and candidate scales


def test_activation_mean_is_the_mean_magnitude_per_channel():
    x = torch.tensor([[[1.0, -2.0, 0.0]], [[-3.0, 2.0, 0.0]]])
    assert torch.equal(activation_mean(x), torch.tensor([2.0, 2.0, 0.0]))


def test_candidate_scales_formula_and_normalisation():
    x_mean = torch.tensor([0.5, 2.0, 8.0, 0.0, 1.0])
    assert torch.equal(candidate_scales(x_mean, 0.0), torch.ones(5))  # r = 0: RTN, even for the dead channel
    s = candidate_scales(x_mean, 0.5)
    raw = torch.tensor([0.5**0.5, 2**0.5, 8**0.5, 1e-4, 1.0])  # the dead channel is clamped to 1e-4
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
    assert (s.max() * s.min()).item() == pytest.approx(1.0, rel=1e-6)
    # only ratios between channels matter: a global factor in x_mean changes nothing
    torch.testing.assert_close(candidate_scales(7 * x_mean[:3], 0.3), candidate_scales(x_mean[:3], 0.3))


def test_duo_scaling_formula():
    x_mean = torch.tensor([0.5, 2.0, 8.0, 1.0])
    w_mean = torch.tensor([0.9, 0.2, 0.5, 0.0])
    r = 0.35
    raw = x_mean**r / (w_mean ** (1 - r) + 1e-4)
    torch.testing.assert_close(candidate_scales(x_mean, r, w_mean), raw / (raw.max() * raw.min()).sqrt())
    assert not torch.equal(candidate_scales(x_mean, 0.0, w_mean), torch.ones(4))  # r = 0 is 1 / w_mean here


def test_weight_mean_is_relative_to_each_group_maximum():
    W1 = torch.tensor([[1.0, -2.0, 4.0, 1.0], [0.5, 0.5, -1.0, 3.0]])
    W2 = torch.tensor([[2.0, 2.0, 0.0, -6.0]])
    expected = torch.zeros(4)
    rows = torch.cat([W1, W2]).abs()
    for row in rows:
        for g in (slice(0, 2), slice(2, 4)):
            expected[g] += row[g] / (row[g].max() + 1e-6)
    torch.testing.assert_close(weight_mean([W1, W2], spec(group_size=2)), expected / 3)
    per_row = weight_mean([W1], spec(group_size=None))
    torch.testing.assert_close(per_row, (W1.abs() / (W1.abs().amax(dim=1, keepdim=True) + 1e-6)).mean(0))


@pytest.mark.parametrize("s", [spec(4, 32), spec(3, 64), spec(4, None), spec(4, 16, symmetric=True)], ids=lambda s: s.describe())
def test_grouped_fake_quant_equals_lesson_01(s):
    W = torch.randn(40, 128, generator=torch.Generator().manual_seed(3))
    assert torch.equal(awq.fake_quantize_groups(W, s), fake_quantize(W, s))


# ---------------------------------------------------------------------------------------------
# The scale search


def test_search_scales_up_a_salient_channel_and_beats_rtn():
    linear, x = salient_problem()
    s = spec(3, 32)
    result = search_scales(linear, ("",), x, spec=s)
    assert result.ratios == [i / 20 for i in range(20)]
    assert result.ratio > 0 and result.losses[0] == pytest.approx(rtn_output_mse(linear, x, s), rel=1e-5)
    assert min(result.losses) < 0.5 * result.losses[0]  # scaling the salient channel halves the error at least
    assert result.scales.argmax().item() == 5  # the salient channel gets the largest scale
    assert result.losses[int(result.ratio * 20)] == min(result.losses)
    # the loss at the chosen r is the output error of the scaled, rounded weight
    W_hat = awq.scaled_fake_quant(linear.weight, result.scales, s)
    assert min(result.losses) == pytest.approx(((x @ (linear.weight - W_hat).T) ** 2).mean().item(), rel=1e-5)


def rtn_output_mse(linear, x, s):
    return ((x @ (linear.weight - fake_quantize(linear.weight, s)).T) ** 2).mean().item()


def test_search_keeps_rtn_when_every_channel_looks_alike():
    linear, x = salient_problem(salient=())
    x = x.sign() * 0.7  # every channel has the same mean |x|: every r gives s = 1
    result = search_scales(linear, ("",), x, spec=spec(4, 32))
    assert result.ratio == 0.0 and torch.equal(result.scales, torch.ones(64))
    assert len(set(result.losses)) == 1  # the same loss twenty times; ties keep the smallest r


def test_search_compares_the_whole_block_and_leaves_it_unchanged():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
    state = copy.deepcopy(block.state_dict())
    x = torch.randn(3, 16, 32)
    x[..., 7] *= 20
    result = search_scales(block, ("0",), x, spec=spec(3, 16), grid=5)
    assert result.ratios == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())
    # the loss is measured on the block's output, with only the first linear quantized
    with torch.no_grad():
        reference = block(x)
        changed = copy.deepcopy(block)
        changed[0].weight.copy_(awq.scaled_fake_quant(block[0].weight, result.scales, spec(3, 16)))
        assert min(result.losses) == pytest.approx(((changed(x) - reference) ** 2).mean().item(), rel=1e-5)


def test_duo_scaling_search_uses_the_weight_statistic():
    linear, x = salient_problem(seed=4)
    plain = search_scales(linear, ("",), x, spec=spec(3, 32))
    duo = search_scales(linear, ("",), x, spec=spec(3, 32), duo_scaling=True)
    w_mean = weight_mean([linear.weight], spec(3, 32))
    torch.testing.assert_close(duo.scales, candidate_scales(activation_mean(x), duo.ratio, w_mean))
    assert duo.losses != plain.losses


# ---------------------------------------------------------------------------------------------
# Folding


def test_fold_into_a_norm_and_into_a_linear_is_exact_in_float64():
    torch.manual_seed(0)
    norm = nn.LayerNorm(16).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)  # a bias is divided by s too
    q, k = nn.Linear(16, 12).double(), nn.Linear(16, 4).double()
    up, down = nn.Linear(8, 16).double(), nn.Linear(16, 8).double()
    h, x = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)

    def outputs():  # ReLU(z / s) = ReLU(z) / s for s > 0, as SiLU(gate) * up is linear in up
        return q(norm(h)), k(norm(h)), down(torch.relu(up(x)))

    before = outputs()
    s_norm, s_up = torch.rand(16, dtype=torch.float64) * 4 + 0.1, torch.rand(16, dtype=torch.float64) * 4 + 0.1
    weights = [m.weight.clone() for m in (norm, q, up, down)]
    fold_scales(norm, [q, k], s_norm)
    fold_scales(up, [down], s_up)
    for a, b in zip(before, outputs()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.weight, weights[0] / s_norm)
    torch.testing.assert_close(q.weight, weights[1] * s_norm)
    torch.testing.assert_close(up.weight, weights[2] / s_up[:, None])  # output rows
    torch.testing.assert_close(down.weight, weights[3] * s_up)  # input columns


@pytest.mark.slow
def test_folding_leaves_a_smollm2_layer_unchanged(reference, tokenizer):
    """The searched scales of layer 2, folded into its norms and up_proj: same float outputs to 1e-5."""
    model = reference[0]
    hidden, kwargs = first_layer_inputs(model, token_windows(tokenizer, "calibration", 128, 2))
    layer = copy.deepcopy(model.model.layers[2])
    with torch.no_grad():
        for earlier in model.model.layers[:2]:
            hidden = torch.cat([earlier(h[None], **kwargs) for h in hidden])
        before = torch.cat([layer(h[None], **kwargs) for h in hidden])
        report, _ = awq_layer(layer, hidden, kwargs, AWQOptions(clip=False))
        after = torch.cat([layer(h[None], **kwargs) for h in hidden])
    assert [g["prev"] for g in report["groups"]] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert any(g["ratio"] > 0 for g in report["groups"])  # something was scaled
    assert not torch.equal(layer.input_layernorm.weight, model.model.layers[2].input_layernorm.weight)
    assert ((after - before).norm() / before.norm()).item() < 1e-5


def test_fold_problem_names_grouped_query_attention():
    mha, gqa = tiny_llama(kv_heads=4).model.layers[0].self_attn, tiny_llama(kv_heads=2).model.layers[0].self_attn
    assert fold_problem(mha.v_proj, [mha.o_proj]) is None
    reason = fold_problem(gqa.v_proj, [gqa.o_proj])
    assert "produces 32 channels but the scaled layers read 64" in reason and "grouped-query" in reason
    with pytest.raises(ValueError, match="cannot fold scales into Linear"):
        fold_scales(gqa.v_proj, [gqa.o_proj], torch.ones(64))


@pytest.mark.parametrize("kv_heads, searched", [(4, True), (2, False)])
def test_v_to_o_is_searched_only_when_the_shapes_match(kv_heads, searched):
    model = tiny_llama(kv_heads)
    report = awq_model(model, tiny_windows(), AWQOptions(spec=spec(4, 32)), progress=False)
    layer = report["model.layers.0"]
    prevs = [g["prev"] for g in layer["groups"]]
    assert ("self_attn.v_proj" in prevs) == searched
    assert [s["prev"] for s in layer["skipped"]] == ([] if searched else ["self_attn.v_proj"])


# ---------------------------------------------------------------------------------------------
# Clipping


def test_clipping_is_never_worse_than_none_on_its_own_objective():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(70, 128, generator=g)
    W[3, 10] = 12.0  # an outlier weight: its group gains from clipping
    x = torch.randn(600, 128, generator=g)
    s = spec(3, 32)
    result = clip_search(W, x, s, batch=32)  # 70 rows in batches of 32, 32, 6
    xs = awq.sample_tokens(x)
    amax = W.abs().reshape(70, 4, 32).amax(-1)
    chosen, unclipped = clip_objective(W, xs, result.max_val, s), clip_objective(W, xs, amax, s)
    assert (chosen <= unclipped).all() and (chosen < unclipped).float().mean() > 0.3
    assert result.step[3, 0] > 0
    torch.testing.assert_close(result.max_val, amax * (1 - result.step / 20))  # one of the candidates
    # an exhaustive check of the choice for a few groups
    for n, gi in ((0, 0), (3, 0), (69, 3)):
        errors = [clip_objective(W[n : n + 1], xs, amax[n : n + 1] * (1 - i / 20), s)[0, gi] for i in range(10)]
        assert result.step[n, gi].item() == int(torch.stack(errors).argmin())
    same = clip_search(W, x, s, batch=256)
    assert torch.equal(same.max_val, result.max_val)
    x[:, 96:] = 0  # the last group's inputs are silent: every clamp ties at error 0, and no clipping is kept
    assert (clip_search(W, x, s).step[:, 3] == 0).all()


def test_clip_samples_tokens_like_llm_awq():
    x = torch.arange(2 * 1030 * 3, dtype=torch.float32).reshape(2, 1030, 3)
    sampled = awq.sample_tokens(x, 512)
    assert torch.equal(sampled, x.reshape(-1, 3)[::4])  # 2060 // 512 = 4
    assert torch.equal(awq.sample_tokens(x[:, :100], 512), x[:, :100].reshape(-1, 3))  # fewer tokens: all


def test_q_and_k_are_never_clipped():
    model = tiny_llama(kv_heads=2)
    hidden, kwargs = first_layer_inputs(model, tiny_windows())
    report, clips = awq_layer(model.model.layers[0], hidden, kwargs, AWQOptions(spec=spec(4, 32)))
    assert {n for n, c in clips.items() if c is None} == {"self_attn.q_proj", "self_attn.k_proj"}
    assert set(report["clip_steps"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert clips["mlp.down_proj"].shape == (64, 128 // 32)
    _, none = awq_layer(tiny_llama(kv_heads=2).model.layers[0], hidden, kwargs, AWQOptions(spec=spec(4, 32), clip=False))
    assert all(c is None for c in none.values())


def test_clipping_is_searched_on_the_scaled_weights_and_inputs():
    model = tiny_llama(kv_heads=2)
    layer = model.model.layers[0]
    hidden, kwargs = first_layer_inputs(model, tiny_windows())
    up_before = layer.mlp.up_proj.weight.detach().clone()
    recorded = awq.record_layer_inputs(layer, hidden, kwargs, ["mlp.down_proj"])["mlp.down_proj"]
    report, clips = awq_layer(layer, hidden, kwargs, AWQOptions(spec=spec(3, 32)))
    assert next(g for g in report["groups"] if g["prev"] == "mlp.up_proj")["ratio"] > 0
    s = (up_before / layer.mlp.up_proj.weight)[:, 0]  # up_proj's output rows were divided by s
    expected = clip_search(layer.mlp.down_proj.weight, recorded / s, spec(3, 32))
    torch.testing.assert_close(clips["mlp.down_proj"], expected.max_val)


# ---------------------------------------------------------------------------------------------
# Equality with llm-awq's loop, transcribed independently (auto_scale.py, auto_clip.py)


def llm_awq_quantize(w, n_bit, group):
    """llm-awq's pseudo_quantize_tensor (zero_point=True): each group's own [min, max]."""
    shape = w.shape
    w = w.reshape(-1, group)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    max_int = 2**n_bit - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    return ((torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales).reshape(shape)


@torch.no_grad()
def llm_awq_layer(layer, hidden, kwargs, n_bit, group):
    """run_awq's body for one LlamaDecoderLayer: inputs, scales, apply, clip; the whole batch at once."""
    named = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    feats = defaultdict(list)
    hooks = [m.register_forward_hook(lambda m, x, y, n=n: feats[n].append(x[0])) for n, m in named.items()]
    layer(hidden, **kwargs)
    for h in hooks:
        h.remove()
    feats = {k: torch.cat(v) for k, v in feats.items()}

    def search(block, linears, x, kw):
        org_out = block(x, **kw)
        org_out = org_out[0] if isinstance(org_out, tuple) else org_out
        x_max = x.abs().view(-1, x.shape[-1]).mean(0)
        best_error, best_ratio, best_scales, history = float("inf"), -1, None, []
        org_sd = {k: v.clone() for k, v in block.state_dict().items()}
        for ratio in range(20):
            ratio = ratio / 20
            scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for fc in linears:
                fc.weight.mul_(scales.view(1, -1))
                fc.weight.data = llm_awq_quantize(fc.weight.data, n_bit, group) / scales.view(1, -1)
            out = block(x, **kw)
            out = out[0] if isinstance(out, tuple) else out
            loss = (org_out - out).float().pow(2).mean().item()
            history.append(loss)
            if loss < best_error:
                best_error, best_ratio, best_scales = loss, ratio, scales
            block.load_state_dict(org_sd)
        return best_ratio, best_scales, history

    a, m = layer.self_attn, layer.mlp
    plan = [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], feats["self_attn.q_proj"], a, kwargs)]
    if a.v_proj.weight.shape == a.o_proj.weight.shape:
        plan.append((a.v_proj, [a.o_proj], feats["self_attn.o_proj"], a.o_proj, {}))
    plan += [
        (layer.post_attention_layernorm, [m.gate_proj, m.up_proj], feats["mlp.gate_proj"], m, {}),
        (m.up_proj, [m.down_proj], feats["mlp.down_proj"], m.down_proj, {}),
    ]
    found = [search(block, fcs, x, kw) for _, fcs, x, block, kw in plan]
    names = {id(mod): n for n, mod in named.items()}
    for (prev, fcs, _, _, _), (_, scales, _) in zip(plan, found):
        if isinstance(prev, nn.Linear):
            prev.weight.div_(scales.view(-1, 1))
        else:
            prev.weight.div_(scales)
        for fc in fcs:
            fc.weight.mul_(scales.view(1, -1))
            feats[names[id(fc)]] = feats[names[id(fc)]] / scales.view(1, -1)
    clips = {}
    for name, fc in named.items():
        if any(t in name for t in ("q_", "k_")):
            continue
        w = fc.weight.reshape(fc.weight.shape[0], 1, -1, group)
        x = feats[name].view(-1, feats[name].shape[-1])
        x = x.reshape(1, x.shape[0], -1, group)
        x = x[:, 0 :: max(1, x.shape[1] // 512)]
        best = []
        for rows in w.split(256):  # llm-awq asserts 256 | out_features; SmolLM2's 192 and 576 need the remainder
            org_max = rows.abs().amax(dim=-1, keepdim=True)
            best_max, min_errs = org_max.clone(), torch.ones_like(org_max) * 1e9
            org_out = (x * rows).sum(dim=-1)
            for i_s in range(10):
                max_val = org_max * (1 - i_s / 20)
                q_w = llm_awq_quantize(torch.clamp(rows, -max_val, max_val), n_bit, group)
                err = ((x * q_w).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_errs.shape)
                better = err < min_errs
                min_errs[better], best_max[better] = err[better], max_val[better]
            best.append(best_max)
        clips[name] = torch.cat(best).squeeze(1).squeeze(-1)
        max_val = clips[name][..., None]
        fc.weight.data = torch.clamp(fc.weight.reshape(*max_val.shape[:2], -1), -max_val, max_val).reshape(fc.weight.shape)
    weights = {n: llm_awq_quantize(fc.weight.data, n_bit, group) for n, fc in named.items()}
    return found, clips, weights


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_matches_an_independent_transcription_of_llm_awq_on_a_smollm2_layer(reference, tokenizer, bits):
    model = reference[0]
    hidden, kwargs = first_layer_inputs(model, token_windows(tokenizer, "calibration", 48, 2))
    with torch.no_grad():
        hidden = torch.cat([model.model.layers[0](h[None], **kwargs) for h in hidden])
    theirs_layer, ours_layer = copy.deepcopy(model.model.layers[1]), copy.deepcopy(model.model.layers[1])
    found, their_clips, their_weights = llm_awq_layer(theirs_layer, hidden, kwargs, bits, 64)
    s = spec(bits, 64)
    report, our_clips = awq_layer(ours_layer, hidden, kwargs, AWQOptions(spec=s))
    assert [g["ratio"] for g in report["groups"]] == [ratio for ratio, _, _ in found]
    for group, (_, _, history) in zip(report["groups"], found):
        assert group["losses"] == pytest.approx(history, rel=1e-4)
    for name, max_val in their_clips.items():
        torch.testing.assert_close(our_clips[name], max_val, rtol=1e-6, atol=0)
    for name, W in their_weights.items():
        linear = ours_layer.get_submodule(name)
        ours = awq.fake_quantize_groups(awq.clip_weight(linear.weight, our_clips[name], s) if our_clips[name] is not None else linear.weight, s)
        torch.testing.assert_close(ours, W, rtol=1e-5, atol=1e-6)
        exported = quantized_linear(linear, s, our_clips[name]).weight  # the same with fp16 scales
        assert ((exported - W).norm() / W.norm()).item() < 1e-3


# ---------------------------------------------------------------------------------------------
# The driver, export and AWQ + GPTQ


def test_driver_calibrates_every_layer_on_the_float_models_activations(monkeypatch):
    model = tiny_llama(kv_heads=2)
    float_model = copy.deepcopy(model)
    windows = tiny_windows()
    seen = {}
    original = awq.awq_layer

    def recording(layer, hidden, kwargs, options):
        seen[len(seen)] = hidden.clone()
        return original(layer, hidden, kwargs, options)

    monkeypatch.setattr(awq, "awq_layer", recording)
    awq_model(model, windows, AWQOptions(spec=spec(3, 32)), progress=False)
    with torch.no_grad():
        float_hidden = float_model(windows, output_hidden_states=True).hidden_states
    for i in range(2):
        assert ((seen[i] - float_hidden[i]).norm() / float_hidden[i].norm()).item() < 1e-5
    assert all(type(m) is GPTQLinear for n, m in model.named_modules() if n.endswith("_proj"))


def test_awq_beats_rtn_on_a_model_with_salient_channels():
    """A tiny Llama whose norms amplify a few channels: AWQ's output is closer than RTN's."""
    model = tiny_llama(kv_heads=2, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] = 25.0
    windows, heldout = tiny_windows(8, 32, seed=1), tiny_windows(8, 32, seed=2)
    rtn = copy.deepcopy(model)
    s = spec(3, 32)
    for name, m in list(rtn.named_modules()):
        if name.endswith("_proj"):
            set_module(rtn, name, quantized_linear(m, s))
    awq_quantized = copy.deepcopy(model)
    awq_model(awq_quantized, windows, AWQOptions(spec=s), progress=False)
    with torch.no_grad():
        reference = model(heldout).logits
        rtn_error = (rtn(heldout).logits - reference).norm()
        awq_error = (awq_quantized(heldout).logits - reference).norm()
    assert awq_error < 0.8 * rtn_error


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_export_loads_into_a_fresh_model_through_the_w4a16_path(tmp_path):
    model = tiny_llama(kv_heads=2)
    windows = tiny_windows()
    options = AWQOptions(spec=spec(4, 32))
    awq_model(model, windows, options, progress=False)
    folder = awq.save_awq(model, tmp_path / "awq", options)
    fresh = tiny_llama(kv_heads=2)  # the same seed: the float model before AWQ, its norms unscaled
    modules = load_gptq(folder, fresh)
    assert len(modules) == 14 and all(type(m) is W4A16Linear for m in modules.values())
    with torch.no_grad():
        assert torch.equal(fresh(windows).logits, model(windows).logits)
    # the fp16 scales of the export are the ones the fake-quant model computes with
    layer = model.model.layers[0].mlp.down_proj
    assert layer.scales.dtype == torch.float16 and layer.codes.max() <= 15
    # the linears alone (the folded norms left out) do not give the AWQ model back
    save_gptq(model, tmp_path / "linears", GPTQOptions(spec=options.spec))
    linears_only = tiny_llama(kv_heads=2)
    load_gptq(tmp_path / "linears", linears_only)
    with torch.no_grad():
        assert relative_error(linears_only(windows).logits, model(windows).logits) > 1e-3


@pytest.mark.slow
def test_awq_checkpoint_of_smollm2_loads_into_a_fresh_reference_model(tmp_path, reference, fresh_model, tokenizer):
    quantized = fresh_model
    quantized.model.layers = quantized.model.layers[:1]
    options = AWQOptions()  # SmolLM2's grid: int4, asymmetric, groups of 64
    awq_model(quantized, token_windows(tokenizer, "calibration", 64, 1), options, progress=False)
    folder = awq.save_awq(quantized, tmp_path / "awq", options)
    floats = {key for key in load_file(folder / "model.safetensors") if key.endswith("norm.weight")}
    assert floats == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    save_gptq(quantized, tmp_path / "linears", GPTQOptions(spec=options.spec))
    fresh = copy.deepcopy(reference[0])  # untouched by AWQ: the reference norms
    fresh.model.layers = fresh.model.layers[:1]
    ids = token_windows(tokenizer, "heldout", 64, 1)
    with torch.no_grad():
        expected = quantized(ids).logits
        load_gptq(tmp_path / "linears", fresh)
        assert relative_error(fresh(ids).logits, expected) > 0.1  # the linears alone: the old export
        load_gptq(folder, fresh)
        assert relative_error(fresh(ids).logits, expected) < 1e-5
    assert torch.equal(fresh.model.layers[0].input_layernorm.weight, quantized.model.layers[0].input_layernorm.weight)


def test_checkpoint_floats_errors(tmp_path):
    model = tiny_llama(kv_heads=2, layers=1)
    awq_model(model, tiny_windows(2, 16), AWQOptions(spec=spec(4, 32)), progress=False)
    with pytest.raises(TypeError, match="AWQOptions the model was quantized with"):
        awq.save_awq(model, tmp_path / "bad", GPTQOptions(spec=spec(4, 32)))
    with pytest.raises(ValueError, match="belongs to a quantized layer"):
        save_gptq(model, tmp_path / "bad", GPTQOptions(spec=spec(4, 32)), floats={"model.layers.0.mlp.up_proj.weight": torch.ones(3)})
    folder = awq.save_awq(model, tmp_path / "awq", AWQOptions(spec=spec(4, 32)))
    other_norm = tiny_llama(kv_heads=2, layers=1)
    other_norm.model.layers[0].input_layernorm = nn.Identity()
    with pytest.raises(ValueError, match="model.layers.0.input_layernorm.weight, which this model lacks"):
        load_gptq(folder, other_norm)
    wider = tiny_llama(kv_heads=2, layers=1)
    wider.model.layers[0].input_layernorm.weight = nn.Parameter(torch.ones(32))
    with pytest.raises(ValueError, match=r"has shape \(64,\), the model's \(32,\)"):
        load_gptq(folder, wider)


@pytest.mark.skipif(not interpreting(), reason="the CPU run of the Triton kernel needs TRITON_INTERPRET=1")
def test_exported_layer_runs_through_the_triton_kernel(tmp_path):
    model = tiny_llama(kv_heads=2, layers=1)
    awq_model(model, tiny_windows(2, 16), AWQOptions(spec=spec(4, 32)), progress=False)
    save_gptq(model, tmp_path, GPTQOptions(spec=spec(4, 32)))
    module = load_gptq(tmp_path, triton=True)["model.layers.0.self_attn.o_proj"]
    x = torch.randn(2, 64)
    expected = model.model.layers[0].self_attn.o_proj(x).double()
    assert ((module(x).double() - expected).norm() / expected.norm()).item() < 1e-5


def test_awq_then_gptq():
    model = tiny_llama(kv_heads=2)
    s = spec(3, 32)
    report = awq_model(model, tiny_windows(8, 32), AWQOptions(spec=s, gptq=GPTQOptions(spec=s)), progress=False)
    assert "model.layers.0" in report and "model.layers.1.mlp.down_proj" in report["gptq"]
    assert all(type(m) is GPTQLinear for n, m in model.named_modules() if n.endswith("_proj"))
    with pytest.raises(ValueError, match="AWQ \\+ GPTQ quantizes with one grid"):
        awq_model(tiny_llama(kv_heads=2), tiny_windows(), AWQOptions(spec=s, gptq=GPTQOptions(spec=spec(4, 32))), progress=False)


def test_quantized_linear_stores_the_grid_of_its_weight():
    linear = nn.Linear(64, 24)
    for s in (spec(4, 32), spec(3, None), spec(4, 16, symmetric=True)):
        layer = quantized_linear(linear, s)
        q = quantize_tensor(linear.weight.detach(), s)
        torch.testing.assert_close(layer.weight, q.dequantize(), rtol=1e-3, atol=1e-3)  # fp16 scales
        assert torch.equal(layer.bias, linear.bias)
    clipped = quantized_linear(linear, spec(4, 32), torch.full((24, 2), 0.01))
    assert clipped.weight.abs().max() <= 0.01 + 0.02 / 15 / 2 + 1e-6  # the clamp, then at most half a step


# ---------------------------------------------------------------------------------------------
# The 1%-salient-channels experiment


def test_salient_channels_and_importance():
    importance = torch.tensor([0.1, 5.0, 0.3, 9.0, 2.0])
    assert salient_channels(importance, 0.4).tolist() == [1, 3]
    assert salient_channels(torch.rand(576), 0.01).numel() == 5 and salient_channels(torch.rand(50), 0.01).numel() == 1
    W = torch.tensor([[1.0, -4.0], [1.0, 2.0]])
    assert awq.channel_importance("weight", W).tolist() == [1.0, 3.0]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(awq.channel_importance("random", W, generator=g1), awq.channel_importance("random", W, generator=g2))


def test_kept_channels_are_exact_and_the_rest_is_rtn():
    linear, _ = salient_problem()
    s = spec(3, 32)
    kept = torch.tensor([5, 40])
    layer = KeptChannelsLinear.from_linear_keeping(linear, s, kept)
    rest = [k for k in range(64) if k not in (5, 40)]
    assert torch.equal(layer.weight[:, kept], linear.weight[:, kept])
    assert torch.equal(layer.weight[:, rest], fake_quantize(linear.weight.detach(), s)[:, rest])
    assert layer.storage_bits() == quantize_tensor(linear.weight.detach(), s).storage_bits() + 2 * (48 + 1) * 32


def test_keeping_salient_inputs_beats_random_and_weight_magnitude():
    model = tiny_llama(kv_heads=2, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 30.0
            layer.post_attention_layernorm.weight[[5, 9]] = 30.0
    windows, heldout = tiny_windows(4, 32, seed=1), tiny_windows(8, 32, seed=2)
    with torch.no_grad():
        reference = model(heldout).logits
    errors = {}
    for kind in ("activation", "random", "weight"):
        quantized = copy.deepcopy(model)
        kept = keep_channels_model(quantized, windows, spec(3, 32), kind, fraction=0.04)
        assert kept["model.layers.0.mlp.down_proj"].numel() == 5 and kept["model.layers.0.self_attn.q_proj"].numel() == 2
        with torch.no_grad():
            errors[kind] = (quantized(heldout).logits - reference).norm().item()
        if kind == "activation":
            assert set(kept["model.layers.0.self_attn.q_proj"].tolist()) == {3, 17}
    assert errors["activation"] < 0.8 * min(errors["random"], errors["weight"])


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda lin, x: search_scales(lin, ("",), x, grid=0), ValueError, "grid is the number of ratios"),
        (lambda lin, x: search_scales(lin, ("",), x[..., :32]), ValueError, "reads 64 input channels but x has 32"),
        (lambda lin, x: search_scales(nn.Sequential(lin, nn.ReLU()), ("1",), x), TypeError, "is a ReLU, not an nn.Linear"),
        (lambda lin, x: search_scales(lin, (), x), ValueError, "at least one linear"),
        (lambda lin, x: search_scales(lin, ("",), x.long()), TypeError, "float tensor"),
        (lambda lin, x: search_scales(lin, ("",), x * float("nan")), ValueError, "NaN/inf"),
        (lambda lin, x: search_scales(lin, ("",), x, spec=spec(4, 48)), ValueError, "group_size 48 does not divide K = 64"),
        (lambda lin, x: search_scales(lin, ("",), x, spec=AffineSpec(bits=4, granularity="tensor")), ValueError, "use granularity 'group' or 'channel'"),
        (lambda lin, x: search_scales(lin, ("",), x, spec=AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32, zero_point="float")), ValueError, "integer zero points"),
        (lambda lin, x: fold_scales(nn.LayerNorm(64), [lin], -torch.ones(64)), ValueError, "finite positive scales"),
        (lambda lin, x: fold_scales(nn.LayerNorm(64), [lin], torch.ones(32)), ValueError, "64 finite positive scales"),
        (lambda lin, x: fold_scales(nn.ReLU(), [lin], torch.ones(64)), TypeError, "cannot fold scales into a ReLU"),
        (lambda lin, x: clip_search(lin.weight, x, steps=0), ValueError, "steps must be an integer from 1 to 20"),
        (lambda lin, x: clip_search(lin.weight, x[..., :8]), ValueError, r"W must be \[N, K\] and x \[..., K\]"),
        (lambda lin, x: salient_channels(torch.ones(10), 0.0), ValueError, "share of input channels kept"),
        (lambda lin, x: awq.channel_importance("gradient", lin.weight), ValueError, "kind must be one of"),
        (lambda lin, x: awq.channel_importance("activation", lin.weight), ValueError, "needs x_mean"),
        (lambda lin, x: awq_model(tiny_llama(2), tiny_windows(), "fast"), TypeError, "options must be an AWQOptions"),
        (lambda lin, x: awq_model(tiny_llama(2), tiny_windows(), AWQOptions(spec=spec(4, 48))), ValueError, "group_size 48 does not divide"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    linear, x = salient_problem()
    with pytest.raises(error, match=message):
        call(linear, x)
