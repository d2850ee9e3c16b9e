"""LoRA's functions (reference_impl/lora_math.py) against the modules and torch's optimizer they
spell out: lora_init against LoraLinear's reset, lora_forward against LoraLinear.forward (with
nn.Dropout's own masks), adamw_step against torch.optim.AdamW, lora_training_step against a
stack of LoraLinear layers trained as qlora.train_adapters trains; and the errors they raise.
"""

import math

import pytest
import torch
from torch import nn

from quantcourse.reference_impl import lora_math
from quantcourse.reference_impl.lora_math import adamw_step, lora_forward, lora_init, lora_training_step
from quantcourse.reference_impl.qlora import LoraLinear


def linear(in_features, out_features, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def randomize(layer: LoraLinear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- lora_init


@pytest.mark.parametrize("in_features, out_features, r", [(48, 32, 8), (7, 5, 1), (64, 200, 16)])
def test_init_draws_what_nn_linear_and_lora_linear_draw(in_features, out_features, r):
    """nn.Linear's own weight init (PEFT initialises A with it) and LoraLinear, from the global generator."""
    torch.manual_seed(11)
    A, B = lora_init(in_features, out_features, r)
    assert A.shape == (r, in_features) and B.shape == (out_features, r) and A.dtype == B.dtype == torch.float32
    torch.manual_seed(11)
    weight = nn.Parameter(torch.empty(r, in_features))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    assert torch.equal(A, weight.detach()) and torch.equal(B, torch.zeros(out_features, r))
    base = linear(in_features, out_features)
    torch.manual_seed(11)
    layer = LoraLinear(base, r=r, alpha=16, dropout=0.0)
    assert torch.equal(A, layer.lora_A.detach()) and torch.equal(B, layer.lora_B.detach())


def test_init_is_uniform_on_one_over_sqrt_fan_in_and_seeded():
    A, B = lora_init(400, 30, 64, seed=3)
    bound = 1 / math.sqrt(400)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # a uniform's std is bound / sqrt(3)
    assert torch.equal(B, torch.zeros(30, 64))
    assert torch.equal(A, lora_init(400, 30, 64, seed=3)[0]) and not torch.equal(A, lora_init(400, 30, 64, seed=4)[0])
    same = torch.empty(64, 400).uniform_(-bound, bound, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(A, same, rtol=0, atol=1e-7)  # the same draw, bound computed another way


def test_init_half_precision_is_the_float32_draw_rounded():
    A16, B16 = lora_init(50, 20, 4, seed=9, dtype=torch.bfloat16)
    A32, _ = lora_init(50, 20, 4, seed=9)
    assert A16.dtype == B16.dtype == torch.bfloat16 and torch.equal(A16, A32.bfloat16())


@pytest.mark.parametrize("args, error", [
    ((0, 4, 2), ValueError), ((4, 4.0, 2), ValueError), ((4, 4, 0), ValueError), ((4, 4, True), ValueError),
    ((4, 4, 2, 0, torch.int32), TypeError), ((4, 4, 2, 0, "float32"), TypeError),
])  # fmt: skip
def test_init_refuses_bad_input(args, error):
    with pytest.raises(error):
        lora_init(*args)


# ---------------------------------------------------------------- lora_forward


@pytest.mark.parametrize("quantize, compute_dtype", [(False, None), (True, None), (True, torch.bfloat16)])
def test_forward_is_lora_linear_forward_in_eval_mode(quantize, compute_dtype):
    layer = LoraLinear.from_linear(linear(96, 40), r=4, alpha=12, dropout=0.1, quantize=quantize, compute_dtype=compute_dtype).eval()
    randomize(layer, 1)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer(x)
        got = lora_forward(x, layer.base_layer(x), layer.lora_A, layer.lora_B, 12, 4)
    assert torch.equal(got, expected)


def test_forward_with_dropout_matches_nn_dropout_given_its_mask():
    """LoraLinear draws its mask with nn.Dropout; the same draws passed as `keep` give the same output."""
    p = 0.3
    layer = LoraLinear.from_linear(linear(64, 64), r=8, alpha=16, dropout=p).train()
    randomize(layer, 3)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    with torch.no_grad():
        expected = layer(x)
    torch.manual_seed(5)
    keep = torch.empty_like(x).bernoulli_(1 - p).bool()  # nn.Dropout's draw: bernoulli(1 - p) on a tensor like x
    with torch.no_grad():
        got = lora_forward(x, layer.base_layer(x), layer.lora_A, layer.lora_B, 16, 8, p, keep)
        torch.manual_seed(5)
        dropped = nn.functional.dropout(x, p, training=True)  # torch's dropout itself, from the same draw
        by_hand = layer.base_layer(x) + (dropped @ layer.lora_A.T @ layer.lora_B.T) * 2
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, by_hand, rtol=1e-6, atol=1e-6)
    assert torch.equal(dropped == 0, ~keep | (x == 0)) and 0 < (~keep).float().mean() < 0.6


def test_forward_half_precision_base_keeps_its_dtype_and_adds_in_float32():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 32, generator=g).bfloat16()
    base_out = torch.randn(4, 16, generator=g).bfloat16()
    A, B = torch.randn(2, 32, generator=g), torch.randn(16, 2, generator=g)
    got = lora_forward(x, base_out, A, B, 4, 2)
    expected = (base_out.float() + (x.float() @ A.T @ B.T) * 2).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_forward_starts_at_the_base_output():
    A, B = lora_init(20, 12, 4, seed=0)
    x, base_out = torch.randn(3, 20), torch.randn(3, 12)
    assert torch.equal(lora_forward(x, base_out, A, B, 8, 4), base_out)


def test_forward_refuses_bad_input():
    x, base_out = torch.randn(3, 20), torch.randn(3, 12)
    A, B = torch.randn(4, 20), torch.randn(12, 4)
    keep = torch.ones(3, 20, dtype=torch.bool)
    bad = [
        ((x, base_out, A, B, 8, 3), ValueError), ((x, base_out, A, B, 8, 0), ValueError), ((x, base_out, A, B, 0, 4), ValueError),
        ((x, base_out, A, B, 8, 4, 1.0), ValueError), ((x, base_out, A, B, 8, 4, -0.1), ValueError),
        ((x[:, :10], base_out, A, B, 8, 4), ValueError), ((x, base_out[:, :6], A, B, 8, 4), ValueError),
        ((x, base_out, A, B.T, 8, 4), ValueError), ((x, base_out, A, B.double(), 8, 4), TypeError),
        ((x, base_out, A, B, 8, 4, 0.1, keep.float()), TypeError), ((x, base_out, A, B, 8, 4, 0.1, keep[:2]), ValueError),
        ((x, base_out, A, B, 8, 4, 0.0, keep), ValueError), ((x.tolist(), base_out, A, B, 8, 4), TypeError),
        ((x.long(), base_out, A, B, 8, 4), TypeError),
    ]  # fmt: skip
    for args, error in bad:
        with pytest.raises(error):
            lora_forward(*args)


# ---------------------------------------------------------------- adamw_step


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_step_is_torch_adamw_bit_for_bit(weight_decay):
    g = torch.Generator().manual_seed(7)
    p = torch.randn(5, 9, generator=g)
    torch_param = nn.Parameter(p.clone())
    optimizer = torch.optim.AdamW([torch_param], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 6):
        grad = torch.randn(5, 9, generator=g) * 10**(step - 3)
        torch_param.grad = grad.clone()
        optimizer.step()
        p, m, v = adamw_step(p, grad, m, v, step, 0.01, (0.8, 0.99), 1e-6, weight_decay)
        state = optimizer.state[torch_param]
        assert torch.equal(p, torch_param.detach()) and torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"])


def test_adamw_step_leaves_its_inputs_alone_and_moves_by_lr_on_the_first_step():
    p, grad = torch.randn(20), torch.randn(20)
    m, v = torch.zeros(20), torch.zeros(20)
    copies = [t.clone() for t in (p, grad, m, v)]
    new_p, _, _ = adamw_step(p, grad, m, v, 1, lr=0.01)
    assert all(torch.equal(a, b) for a, b in zip(copies, (p, grad, m, v)))
    torch.testing.assert_close(new_p, p - 0.01 * grad.sign(), rtol=0, atol=1e-7)  # m_hat / sqrt(v_hat) = sign(g)


def test_adamw_step_refuses_bad_input():
    p = torch.randn(3, 4)
    z = torch.zeros(3, 4)
    for args, error in [((p, p, z, z, 0), ValueError), ((p, p, z, z, 1.0), ValueError), ((p, p[:2], z, z, 1), ValueError),
                        ((p, p, z.double(), z, 1), ValueError), ((p, p, z, z, 1, -1.0), ValueError),
                        ((p, p, z, z, 1, 1e-3, (0.9, 1.0)), ValueError), ((p, p, z, z, 1, 1e-3, (0.9, 0.999), 1e-8, -0.1), ValueError),
                        ((p.int(), p, z, z, 1), TypeError)]:  # fmt: skip
        with pytest.raises(error):
            adamw_step(*args)


# ---------------------------------------------------------------- lora_training_step


def module_stack(seed: int, p: float) -> list[LoraLinear]:
    layers = [LoraLinear.from_linear(linear(24, 40, seed=seed), r=4, alpha=8, dropout=p),
              LoraLinear.from_linear(linear(40, 10, bias=False, seed=seed + 1), r=4, alpha=8, dropout=p)]  # fmt: skip
    for i, layer in enumerate(layers):
        randomize(layer, seed + 10 + i)
    return layers


def functional_view(layers: list[LoraLinear]):
    bases = [{"packed": l.base_layer.weight_packed, "state": l.base_layer.quant_state, "bias": l.base_layer.bias} for l in layers]
    return bases, [(l.lora_A.detach().clone(), l.lora_B.detach().clone()) for l in layers]


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_training_steps_match_lora_linear_with_torch_adamw_and_clipping(p):
    layers = module_stack(20, p)
    bases, adapters = functional_view(layers)
    params = [t for layer in layers for t in (layer.lora_A, layer.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)
    g = torch.Generator().manual_seed(21)
    state = None
    for step in range(3):
        x = torch.randn(12, 24, generator=g) * 3
        labels = torch.randint(0, 10, (12,), generator=g)
        torch.manual_seed(100 + step)
        loss = nn.functional.cross_entropy(layers[1](layers[0](x)), labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad()
        keeps = None
        if p > 0:  # the masks the two nn.Dropout modules drew, in the order they drew them
            torch.manual_seed(100 + step)
            keeps = [torch.empty(12, 24).bernoulli_(1 - p).bool(), torch.empty(12, 40).bernoulli_(1 - p).bool()]
        got_loss, adapters, state = lora_training_step(x, labels, bases, adapters, 8, 4, state, lr=0.01, dropout=p, keeps=keeps)
        assert norm > 0.3, "the clipping should act in this test"
        assert got_loss == pytest.approx(loss.item(), rel=1e-6)
        assert state["step"] == step + 1
        for (A, B), layer, m, v in zip(adapters, layers, state["exp_avg"], state["exp_avg_sq"]):
            torch.testing.assert_close(A, layer.lora_A.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(B, layer.lora_B.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(m[0], optimizer.state[layer.lora_A]["exp_avg"], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(v[1], optimizer.state[layer.lora_B]["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_training_step_needs_the_frozen_layers_in_the_graph():
    """Detaching the frozen base output of layer 2 would cut layer 1's adapters off from most of the loss."""
    layers = module_stack(30, 0.0)
    bases, adapters = functional_view(layers)
    g = torch.Generator().manual_seed(31)
    x, labels = torch.randn(8, 24, generator=g), torch.randint(0, 10, (8,), generator=g)
    _, (first, second), _ = lora_training_step(x, labels, bases, adapters, 8, 4, max_grad_norm=100.0)
    assert all(not torch.equal(new, old) for new, old in zip(first + second, adapters[0] + adapters[1]))
    for base in bases:  # the inputs, frozen weights included, are untouched
        assert base["packed"].dtype == torch.uint8 and not base["packed"].requires_grad


def test_training_step_with_b_zero_leaves_a_alone_at_first():
    """B = 0: dL/dA = scaling * (dL/dy B)^T x = 0, so the first step moves only B."""
    layers = module_stack(40, 0.0)
    bases, _ = functional_view(layers)
    adapters = [lora_init(24, 40, 4, seed=0), lora_init(40, 10, 4, seed=1)]
    g = torch.Generator().manual_seed(41)
    x, labels = torch.randn(8, 24, generator=g), torch.randint(0, 10, (8,), generator=g)
    _, new, state = lora_training_step(x, labels, bases, adapters, 8, 4)
    for (A, B), (A0, B0), (mA, _) in zip(new, adapters, state["exp_avg"]):
        assert torch.equal(A, A0) and torch.equal(mA, torch.zeros_like(A0)) and not torch.equal(B, B0)


def test_training_step_refuses_bad_input():
    layers = module_stack(50, 0.0)
    bases, adapters = functional_view(layers)
    x, labels = torch.randn(4, 24), torch.randint(0, 10, (4,))
    for args, kwargs, error in [
        ((x, labels, bases, adapters[:1], 8, 4), {}, ValueError), ((x, labels, [], [], 8, 4), {}, ValueError),
        ((x, labels.int(), bases, adapters, 8, 4), {}, TypeError), ((x, labels, bases, adapters, 8, 4), {"max_grad_norm": 0}, ValueError),
        ((x, labels, bases, adapters, 8, 4), {"keeps": [None]}, ValueError),
    ]:  # fmt: skip
        with pytest.raises(error):
            lora_training_step(*args, **kwargs)


def test_clip_norm_is_the_qlora_scripts():
    assert lora_math.CLIP_NORM == 0.3 and lora_math.ADAMW_BETAS == (0.9, 0.999) and lora_math.ADAMW_EPS == 1e-8
