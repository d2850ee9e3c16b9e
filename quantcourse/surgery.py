"""Model surgery shared by every lesson: find linear layers, swap them for quantized modules,
record what flows into them, and run a decoder one layer at a time.

The layer-by-layer runner is what GPTQ and AWQ need: quantize decoder layer i using the inputs it
receives from the *already quantized* layers before it, then recompute its outputs for layer i+1.
"""

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (`model.model.layers` for Llama)."""
    try:
        return model.model.layers
    except AttributeError:
        raise TypeError(
            f"{type(model).__name__} has no model.layers: the surgery utilities expect a "
            "transformers decoder-only model such as the LlamaForCausalLM of load_reference_model()"
        ) from None


def linear_layers(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Every `nn.Linear` by qualified name, in forward order.

    The output head is left out unless asked for: SmolLM2 ties it to the embedding matrix, and
    the recipes of the course (like GPTQ's and AWQ's) keep it in floating point.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_lm_head or name != "lm_head")
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` (e.g. "model.layers.0.mlp.down_proj")."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module],
    names: Iterable[str] | None = None,
    progress: bool = False,
) -> dict[str, nn.Module]:
    """Replace linear layers by `make(name, linear)`, in place; returns the new modules by name.

    `names` defaults to `linear_layers(model)`. Typical use:
    `replace_linears(model, lambda name, lin: FakeQuantLinear.from_linear(lin, spec))`.
    """
    layers = linear_layers(model, include_lm_head=True)
    chosen = list(linear_layers(model)) if names is None else list(names)
    unknown = [n for n in chosen if n not in layers]
    if unknown:
        raise KeyError(f"not linear layers of this model: {unknown[:3]}; see linear_layers(model)")
    replaced = {}
    for name in tqdm(chosen, desc="quantize", disable=not progress, leave=False):
        replaced[name] = make(name, layers[name])
        set_module(model, name, replaced[name])
    return replaced


@contextmanager
def record_inputs(modules: dict[str, nn.Module]):
    """While active, append each module's input to `recorded[name]` as [tokens, features].

    Usage: `with record_inputs(linear_layers(model)) as recorded: model(ids)`; afterwards
    `torch.cat(recorded[name])` holds every token that reached that layer (float32, detached).
    """
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach()
            recorded[name].append(x.reshape(-1, x.shape[-1]).float())

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_inputs(model, windows: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Inputs of the named linear layers (default: all) on windows [n, L] int64.

    Returns name -> [n*L, in_features] float32. Memory grows with n*L*layers: for all 210
    SmolLM2 layers keep n*L to a few thousand tokens.
    """
    layers = linear_layers(model)
    chosen = {n: layers[n] for n in (layers if names is None else names)}
    with record_inputs(chosen) as recorded:
        for window in windows:
            model(window[None], use_cache=False)
    return {name: torch.cat(xs) for name, xs in recorded.items()}


class _StopForward(Exception):
    """Raised by a hook once the inputs of the first decoder layer are captured."""


@torch.no_grad()
def first_layer_inputs(model, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder layer 0, and the keyword arguments it is called with.

    Returns hidden [n, L, hidden] (the embeddings) and kwargs (causal mask, rotary position
    embeddings, ...), which are the same for every window of length L.
    """
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("hidden", []).append(args[0] if args else kwargs["hidden_states"])
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window[None], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured["hidden"]), captured["kwargs"]


def run_layer_by_layer(
    model,
    windows: torch.Tensor,
    step: Callable[[int, nn.Module, torch.Tensor], torch.Tensor | None],
    progress: bool = True,
) -> torch.Tensor:
    """Walk the decoder one layer at a time, feeding layer i's outputs to layer i+1.

    For each layer i: `step(i, layer, hidden)` sees the hidden states entering it ([n, L, hidden]
    float32, computed by the layers before it *as they are now*, i.e. already quantized) and may
    change the layer in place (calibrate, quantize, swap modules). Then the layer's outputs are
    recomputed with the changed layer and become the next layer's inputs; a step that already
    computed them (equal to the changed layer's forward) returns them instead, to save that pass.

    Returns the hidden states after the last layer, before the final norm: [n, L, hidden].
    """
    hidden, kwargs = first_layer_inputs(model, windows)
    layers = decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="layer by layer", disable=not progress)):
        outputs = step(i, layer, hidden)
        if outputs is None:
            with torch.no_grad():
                outputs = torch.cat([layer(h[None], **kwargs) for h in hidden])
        hidden = outputs
    return hidden
