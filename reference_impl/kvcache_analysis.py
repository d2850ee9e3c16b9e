"""The KV cache seen from the data's side: the measurements lesson 08 makes with kvcache.py.

kvcache.py holds the schemes, the memory calculator and the transformers cache. This module holds
what the lesson measures about them on SmolLM2:

- What attention reads. `collect_attention_states` records, for chosen decoder layers, the
  queries, keys and values exactly as attention uses them (after the rotary position embedding,
  RoPE), and the keys before RoPE, and stops each forward pass after the last layer asked for.
- The structure of keys and values. `channel_absmax` (the largest |x| of each head and channel
  over all tokens) and `channel_ratio` (that over the median channel's) show the few large key
  channels; `pair_magnitude` undoes RoPE's rotation: RoPE turns each pair of channels
  (i, i + D/2) by the angle position x inv_freq[i], so sqrt(x_i^2 + x_{i+D/2}^2) is the same
  before and after it. Pairs with a small inv_freq barely turn over a whole context; their
  channels keep their sign and size from token to token.
- Grouped quantization along either axis (`fake_quantize_groups`): KIVI's asymmetric codes in
  groups of G channels of one token ("token") or of G tokens of one channel ("channel"), with no
  full-precision window, to compare the two axes on the same tensor.
- What a cache holds (`stored`): the K and V a `QuantizedKVLayer` hands to attention after it
  has been written T tokens, window included. The stored state after T tokens does not depend on
  how the tokens were written (key groups start at multiples of G), so one write suffices.
- What attention makes of the errors. A key error moves the scores s = q.k / sqrt(D), which go
  through a softmax; a value error moves the output sum_t p_t v_t directly. `causal_scores`,
  `attend`, `score_error_rms` and `score_error_by_channel` measure the first, `decode_error` the
  whole step: the output of the query at position t over the cache as it stands after t + 1
  tokens (what one decoding step reads), against the unquantized cache.
- Which tensor an error comes from. `SplitSchemeCache` stores K in one scheme and V in another,
  and `score_caches` measures any caches on the model (perplexity, KL divergence and top-1
  agreement against the fp32 cache), so the damage of a scheme can be split between K and V.
- Capacity (`max_sequences`): how many sequences of a given context fit in a memory budget.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from . import kvcache as kv

Axis = kv.Axis


# ---------------------------------------------------------------------------------------------
# What attention reads


@dataclass
class AttentionStates:
    """One decoder layer's attention inputs over n windows of T tokens, float32.

    queries [n, H_q, T, D] and keys [n, H_kv, T, D] after RoPE (what the cache stores and attention
    reads), values [n, H_kv, T, D], keys_pre_rope [n, H_kv, T, D] (the k_proj output).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    keys_pre_rope: torch.Tensor


class _Enough(Exception):
    """Raised by the hook of the last layer asked for: the rest of the forward pass is not needed."""


@torch.inference_mode()
def collect_attention_states(model, windows: torch.Tensor, layers: Iterable[int] | None = None) -> dict[int, AttentionStates]:
    """Queries, keys and values of the chosen decoder layers (all by default) over windows [n, T] int64.

    A hook before each chosen attention module recomputes q, k and v from the module's own
    projections and applies the model's RoPE (transformers' apply_rotary_pos_emb, with the
    position embeddings the model passes in): the same tensors the attention computes. The forward
    pass stops after the last chosen layer. Returns {layer index: AttentionStates}.
    """
    decoder = model.model.layers
    chosen = sorted(set(range(len(decoder)) if layers is None else layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= len(decoder):
        raise ValueError(f"layers must be indices of the {len(decoder)} decoder layers, got {chosen}")
    found: dict[int, AttentionStates] = {}

    def hook_for(index):
        def hook(attention, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, attention.head_dim)  # [n, T, heads, D]
            q = attention.q_proj(hidden).view(shape).transpose(1, 2)
            k = attention.k_proj(hidden).view(shape).transpose(1, 2)
            v = attention.v_proj(hidden).view(shape).transpose(1, 2)
            q_rope, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
            found[index] = AttentionStates(q_rope.float(), k_rope.float(), v.float(), k.float())
            if index == chosen[-1]:
                raise _Enough

        return hook

    handles = [decoder[i].self_attn.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in chosen]
    try:
        model(windows, use_cache=False)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Largest |x| of each head and channel over all windows and tokens: [n, H, T, D] -> [H, D]."""
    return x.abs().amax(dim=(0, 2))


def channel_ratio(x: torch.Tensor) -> torch.Tensor:
    """How far each channel stands out: its largest |x| over the median channel's, per head.

    x: [n, H, T, D] -> [H * D] float32, the heads side by side (1 for a channel of median size).
    """
    amax = channel_absmax(x)
    return (amax / amax.median(dim=-1, keepdim=True).values).flatten()


def pair_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Length of each RoPE pair (channel i with channel i + D/2): [..., D] -> [..., D/2].

    RoPE rotates every such pair by an angle that depends on the position only, so the lengths are
    the same before and after it.
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE pairs channel i with i + D/2: the last axis must be even, got {D}")
    return torch.sqrt(x[..., : D // 2].square() + x[..., D // 2 :].square())


# ---------------------------------------------------------------------------------------------
# Quantizing along either axis, and what the cache stores


def fake_quantize_groups(x: torch.Tensor, bits: int, group_size: int, axis: Axis) -> torch.Tensor:
    """KIVI's asymmetric group quantization of x [..., T, D], dequantized, float32, no window.

    axis "token": groups of `group_size` consecutive channels of one token (KIVI's values);
    "channel": groups of `group_size` consecutive tokens of one channel (KIVI's keys), which needs
    T to be a multiple of group_size.
    """
    if axis == "token":
        return kv.dequantize_groups(kv.quantize_groups(x, bits, group_size))
    if axis != "channel":
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    if x.shape[-2] % group_size:
        raise ValueError(f"{x.shape[-2]} tokens are not a multiple of group_size {group_size}: trim them to whole groups")
    along_tokens = x.transpose(-1, -2).contiguous()
    return kv.dequantize_groups(kv.quantize_groups(along_tokens, bits, group_size)).transpose(-1, -2)


@torch.inference_mode()
def stored(keys: torch.Tensor, values: torch.Tensor, scheme: "kv.KVScheme | str", key_scale=None, value_scale=None):
    """K and V as a QuantizedKVLayer in `scheme` returns them after being written keys, values [B, H, T, D].

    key_scale, value_scale: the layer's fp8 scales (None: fixed by this write, as the cache does).
    Returns (keys, values) dequantized, in the input dtype; KIVI's newest tokens exact.
    """
    layer = kv.QuantizedKVLayer(kv.get_scheme(scheme), key_scale, value_scale)
    return layer.update(keys, values)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """||x_hat - x|| / ||x||, over all elements (dims None) or over `dims` (the others remain)."""
    if dims is None:
        return (x_hat - x).norm() / x.norm()
    return (x_hat - x).square().sum(dim=dims).sqrt() / x.square().sum(dim=dims).sqrt()


# ---------------------------------------------------------------------------------------------
# What attention makes of the errors


def _expand_heads(k: torch.Tensor, query_heads: int) -> torch.Tensor:
    """[n, H_kv, T, D] -> [n, H_q, T, D]: query head j reads KV head j // (H_q / H_kv) (GQA)."""
    if query_heads % k.shape[1]:
        raise ValueError(f"{query_heads} query heads cannot share {k.shape[1]} KV heads evenly")
    return k.repeat_interleave(query_heads // k.shape[1], dim=1)


def causal_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention scores q.k / sqrt(D) of queries [n, H_q, T, D] over keys [n, H_kv, T, D].

    Returns [n, H_q, T, T] (query position, key position), -inf where the key comes after the query.
    """
    T = q.shape[-2]
    scores = q @ _expand_heads(k, q.shape[1]).transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of queries [n, H_q, Tq, D], the last Tq of the Tk positions, over keys and
    values [n, H_kv, Tk, D]: the query at position Tk - Tq + i sees keys 0..Tk - Tq + i.

    Returns [n, H_q, Tq, D] (the per-head outputs before o_proj).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)


def score_error_rms(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor) -> torch.Tensor:
    """Root mean square of the score error (q . (k_hat - k)) / sqrt(D) over every causal (query s,
    key t <= s) pair, for queries [n, H_q, T, D] and keys [n, H_kv, T, D]. Returns a float32 scalar.

    Scores are linear in the keys, so the errors are the scores of the key errors: one product.
    """
    errors = causal_scores(q, k_hat - k)
    return errors[torch.isfinite(errors)].square().mean().sqrt()


def score_error_by_channel(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor) -> torch.Tensor:
    """Each key channel's share of the score error: [D], mean over heads, windows and causal pairs of
    (q_c (k_hat_c - k_c))^2 / D, for queries [n, H_q, T, D] and keys [n, H_kv, T, D].

    The score error of a pair is sum_c q_c (k_hat_c - k_c) / sqrt(D); where the channels' errors
    are uncorrelated its mean square is the sum of these shares. Computed without the [T, T]
    matrix: for a query at s, sum over t <= s of q_s^2 e_t^2 = q_s^2 x (running sum of e^2).
    """
    e2 = _expand_heads((k_hat - k).square(), q.shape[1])  # [n, H_q, T, D]
    seen = e2.cumsum(dim=-2)  # sum over keys t <= s
    T = q.shape[-2]
    pairs = q.shape[0] * q.shape[1] * T * (T + 1) / 2
    return (q.square() * seen).sum(dim=(0, 1, 2)) / (pairs * q.shape[-1])


@torch.inference_mode()
def decode_error(states: AttentionStates, scheme: "kv.KVScheme | str", positions: Iterable[int], key_scale=None,
                 value_scale=None) -> torch.Tensor:  # fmt: skip
    """Relative error of one decoding step's attention output, at each position t in `positions`.

    The query at t attends over the cache in `scheme` as it stands after t + 1 tokens (what the
    step reads) and over the exact K and V; the error is ||o_hat - o|| / ||o|| over all windows,
    heads and channels. Returns float32 [len(positions)].
    """
    errors = []
    for t in positions:
        q = states.queries[..., t : t + 1, :]
        k, v = states.keys[..., : t + 1, :], states.values[..., : t + 1, :]
        k_hat, v_hat = stored(k, v, scheme, key_scale, value_scale)
        errors.append(relative_error(attend(q, k, v), attend(q, k_hat, v_hat)))
    return torch.stack(errors)


class SplitSchemeLayer(kv.QuantizedKVLayer):
    """A QuantizedKVLayer whose keys are stored in one scheme and values in another."""

    def __init__(self, key_scheme: kv.KVScheme, value_scheme: kv.KVScheme, key_scale=None, value_scale=None):
        super().__init__(key_scheme, key_scale, value_scale)
        self.value_scheme = value_scheme

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.value_scheme.kind == "grouped" and key_states.shape[-1] % self.value_scheme.group_size:
            raise ValueError(f"head_dim {key_states.shape[-1]} is not a multiple of the value scheme's group_size")
        self.value_store = kv.make_store(self.value_scheme, "value", self.value_scale)


class SplitSchemeCache(Cache):
    """A transformers Cache with K in `key_scheme` and V in `value_scheme` (e.g. fp8 keys, fp32 values).

    fp8_scales: optional float32 [layers, 2] per-layer (K, V) scales, as for QuantizedKVCache; a
    column is used only where its tensor is stored in fp8.
    """

    def __init__(self, config, key_scheme: "kv.KVScheme | str", value_scheme: "kv.KVScheme | str", fp8_scales=None):
        key_scheme, value_scheme = kv.get_scheme(key_scheme), kv.get_scheme(value_scheme)
        layers = config.get_text_config(decoder=True).num_hidden_layers
        if fp8_scales is not None and tuple(fp8_scales.shape) != (layers, 2):
            raise ValueError(f"fp8_scales must be a [{layers}, 2] tensor: the K and V scale of each layer")

        def scale(i, j, scheme):
            return fp8_scales[i, j] if fp8_scales is not None and scheme.kind == "fp8" else None

        super().__init__(layers=[SplitSchemeLayer(key_scheme, value_scheme, scale(i, 0, key_scheme), scale(i, 1, value_scheme))
                                 for i in range(layers)])  # fmt: skip


@torch.inference_mode()
def score_caches(model, windows: torch.Tensor, caches: dict[str, Callable[[], Cache]]) -> dict[str, dict]:
    """Perplexity, KLD and top-1 agreement of each cache against the fp32 cache, one forward pass
    per window [n, L] (every position but the last scored); each entry also holds the fp32 cache's
    perplexity on the same tokens ("reference_ppl").

    caches: name -> a function returning a fresh, empty Cache. A single pass writes the whole
    window before attention reads it, which is what token-by-token decoding stores for per-token
    schemes (int8, fp8 with given scales, fp32/fp16), not for KIVI's window: use
    `kvcache.score_schemes` for those.
    """
    tallies = {name: kv.Tally() for name in caches}
    reference_tally = kv.Tally()
    for window in windows:
        ids = window[None]
        targets = window[1:]
        reference = kv.QuantizedKVCache(model.config, "fp32")
        logp = F.log_softmax(model(ids, past_key_values=reference, use_cache=True).logits[0, :-1].float(), -1)
        reference_tally.add(logp, logp, targets)
        for name, make in caches.items():
            logq = F.log_softmax(model(ids, past_key_values=make(), use_cache=True).logits[0, :-1].float(), -1)
            tallies[name].add(logp, logq, targets)
    reference_ppl = reference_tally.summary()["ppl"]
    return {name: {**tally.summary(), "reference_ppl": reference_ppl} for name, tally in tallies.items()}


# ---------------------------------------------------------------------------------------------
# Capacity


def max_sequences(config: kv.KVConfig, scheme: "kv.KVScheme | str", context: int, budget_bytes: float,
                  float_bytes: int = 2) -> int:  # fmt: skip
    """The most sequences of `context` tokens whose cache fits in `budget_bytes` (0 if none does).

    The cache's bytes are a fixed part (fp8's per-layer scales) plus the same amount per sequence;
    float_bytes: width of KIVI's full-precision window (2 for a bf16/fp16 model).
    """
    if context < 1:
        raise ValueError(f"context must be at least 1 token, got {context}")
    one = kv.kv_cache_memory(config, scheme, context, 1, float_bytes).total
    per_sequence = kv.kv_cache_memory(config, scheme, context, 2, float_bytes).total - one
    fixed = one - per_sequence
    return max(0, math.floor((budget_bytes - fixed) / per_sequence))
