"""Finding, replacing and observing linear layers; the layer-by-layer runner."""

import pytest
import torch
from torch import nn

from quantcourse import surgery
from quantcourse.corpus import token_windows


@pytest.fixture(scope="module")
def windows(tokenizer):
    return token_windows(tokenizer, "calibration", length=32, count=2)


def test_linear_layers_are_the_210_decoder_projections(reference):
    layers = surgery.linear_layers(reference[0])
    assert len(layers) == 30 * 7
    assert list(layers)[:7] == [
        f"model.layers.0.{n}"
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]  # fmt: skip
    assert "lm_head" in surgery.linear_layers(reference[0], include_lm_head=True)


def test_replace_linears_swaps_in_place(fresh_model):
    class Doubled(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return 2 * self.linear(x)

    name = "model.layers.5.mlp.down_proj"
    replaced = surgery.replace_linears(fresh_model, lambda n, lin: Doubled(lin), names=[name])
    assert fresh_model.get_submodule(name) is replaced[name]
    assert len(surgery.linear_layers(fresh_model)) == 210  # the wrapped Linear is still found inside
    with pytest.raises(KeyError, match="not linear layers"):
        surgery.replace_linears(fresh_model, lambda n, lin: lin, names=["model.layers.5.mlp"])


def test_record_inputs_sees_every_token(reference, windows):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"]
    inputs = surgery.collect_inputs(reference[0], windows, names)
    assert inputs[names[0]].shape == (2 * 32, 576)
    assert inputs[names[1]].shape == (2 * 32, 1536)
    # hooks are removed afterwards
    assert not reference[0].get_submodule(names[0])._forward_pre_hooks


def test_layer_by_layer_reproduces_the_full_forward(reference, windows):
    model = reference[0]
    final_inputs = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: final_inputs.append(args[0]))
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    handle.remove()
    hidden = surgery.run_layer_by_layer(model, windows, lambda i, layer, h: None, progress=False)
    torch.testing.assert_close(hidden, torch.cat(final_inputs), rtol=0, atol=1e-4)


def test_layer_by_layer_feeds_changed_layers_forward(fresh_model, windows):
    seen = {}

    def step(i, layer, hidden):
        seen[i] = hidden.clone()
        if i == 0:
            layer.mlp.down_proj.weight.zero_()  # change layer 0; layer 1 must see the change

    surgery.run_layer_by_layer(fresh_model, windows, step, progress=False)
    after_change = surgery.collect_inputs(fresh_model, windows, ["model.layers.1.self_attn.q_proj"])
    layer1_input = fresh_model.model.layers[1].input_layernorm(seen[1])
    torch.testing.assert_close(layer1_input.reshape(-1, 576), after_change["model.layers.1.self_attn.q_proj"])
