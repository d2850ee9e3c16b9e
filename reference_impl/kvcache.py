"""KV-cache quantization: how much memory the cache takes, and how to store it in fewer bits.

While a decoder generates, every attention layer keeps the keys and values of all earlier tokens
(the KV cache) so that each new token computes only its own. Per token the cache holds

    2 (K and V) x layers x kv_heads x head_dim   numbers

With grouped-query attention (GQA) several query heads share one K/V head, so `kv_heads` is smaller
than the number of query heads: SmolLM2-135M has 9 query heads and 3 KV heads, Llama-3-8B 32 and 8.
The cache grows with context x batch while the weights do not: at long context or large batch it
is the cache, not the weights, that fills the GPU, and every decode step reads all of it.

Schemes (`SCHEMES`), each a `KVScheme`:

- fp32 / fp16: the cache in floating point; fp32 is the reference here (the model runs in fp32).
- int8: symmetric, one fp32 scale per token and head (absmax / 127 over head_dim).
- fp8 E4M3 / E5M2 (vLLM's `kv_cache_dtype="fp8_e4m3"` / `"fp8_e5m2"`): one fp32 scale per layer
  for K and one for V, x_hat = scale * fp8(x / scale). The scale maps the largest magnitude seen
  (calibrated, or the first write) onto the format's largest finite value: 448 for OCP e4m3fn
  (AMD's e4m3fnuz stops at 240), 57344 for e5m2. Larger values later saturate at that maximum.
- KIVI int4 / int2 (Liu et al., 2024, "KIVI: a tuning-free asymmetric 2bit quantization for KV
  cache"): asymmetric codes x_hat = scale * q + min with an fp16 scale and minimum per group.
  Keys are grouped *per channel* over G consecutive tokens, values *per token* over G consecutive
  channels. KIVI's observation: in keys the magnitude is mostly a property of the channel (some
  channels are large in every token), so a group along one channel sees one magnitude, while a
  group along a token must span the large channels and its small ones round to a coarse grid.
  Values show no such channels, and each attention output is a mix of value rows weighted by the
  attention, so a per-token error stays confined to its own row. The newest R tokens (R a
  multiple of G) stay in full precision: recent tokens get most of the attention. Keys leave that
  window one group of G at a time, so the newest R keys are always exact (KIVI's released code
  quantizes R keys at once when R have gathered, keeping only the newest T mod R).
- naive int4 / int2: the KIVI code format with keys grouped per token like the values and no
  full-precision window: the contrast that shows why KIVI's key axis matters.

Memory arithmetic: `KVConfig` (layers, KV heads, head dim; from a Hugging Face config too) and
`kv_cache_memory`, which counts codes, quantization constants and the full-precision window.

The cache: `QuantizedKVCache` is a transformers `Cache` whose layers store the quantized form only
(codes and constants, plus the residual window) and hand attention the dequantized K/V. Its size
is measured from those tensors (`QuantizedKVCache.nbytes`) and matches the calculator. KIVI's
window rule is one pure function, `update_residual_window` (state and new tokens in, new state
out), which `GroupedStore` calls; the stores can be swapped (`stores=`), as lab 08 does with the
learner's functions.

Layout (what a decode-attention kernel reads; B batch, H KV heads, T tokens, D head_dim):
    int8  K and V: codes int8 [B, H, T, D], scales float32 [B, H, T] (one per token and head).
    fp8   K and V: codes float8_e4m3fn or float8_e5m2 [B, H, T, D], scale float32 [] per layer.
    KIVI  keys:   codes uint8 [B, H, D, Tq * bits / 8] (transposed, packed along tokens, lowest
                  bits first), scale and min float16 [B, H, D, Tq / G]; residual [B, H, T - Tq, D].
          values: codes uint8 [B, H, Tq, D * bits / 8], scale and min float16 [B, H, Tq, D / G];
                  residual [B, H, T - Tq, D] in the model's dtype.

When attention reads the cache: every `update` first writes the new tokens, then returns the whole
cache dequantized, the new tokens included. Attention therefore reads exactly what is stored, also
during the prompt (prefill). Deployments differ here: KIVI's code and transformers' QuantizedCache
run the prompt's own attention on the unquantized states, so this cache is a little pessimistic
for the prompt; for decoding, where each step adds one token, the two agree.

How evaluation feeds the cache (`score_schemes`). A single forward pass over a 2048-token window
would write all tokens and read them back in one go; for KIVI the residual window would then be the
last R tokens of the window, while a query at position t should see positions t-R+1..t exact, and
a group of G keys would be quantized before the queries inside it ran. So evaluation feeds each
window through the cache in chunks of `chunk_size` tokens, the way decoding does, and scores every
position from the logits of its chunk: as many tokens of forward pass as one single pass.

- Per-token schemes (int8, fp8 with its scale fixed, naive): every token is quantized on its own,
  so the cache stores what token-by-token decoding would store, whatever the chunk size. (In float
  arithmetic the model's K/V differ in their last bits between chunk sizes, as matmuls of other
  shapes round differently; a value on a rounding boundary then lands on the neighbouring code, so
  two chunk sizes give two equally valid samples of the quantization noise, not identical logits.)
- KIVI: the window rule runs once per chunk, after the chunk is written, so the first query of a
  chunk sees up to chunk_size - 1 more tokens quantized than token-by-token decoding would give
  it, the oldest of its window (at most 31 of the 128 with 32-token chunks and R = 128): slightly
  pessimistic. The stored state after T tokens does not depend on the chunking, since groups
  always start at multiples of G.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .affine import dequantize, quant_range, quantize, round_half, scale_zero_point

Kind = Literal["float", "int8", "fp8", "grouped"]
Axis = Literal["channel", "token"]
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CONSTANT_DTYPE = torch.float16  # KIVI's scale and minimum: the dtype of the model it ran (fp16)
PACKABLE_BITS = (2, 4, 8)


# ---------------------------------------------------------------------------------------------
# Model shapes and schemes


@dataclass(frozen=True)
class KVConfig:
    """The shapes that decide the KV cache's size.

    layers: decoder layers that cache K and V. kv_heads: K/V heads per layer (fewer than the query
    heads under GQA, equal without it). head_dim: numbers per head. query_heads: for reporting the
    GQA ratio only; the cache does not depend on it.
    """

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    query_heads: int | None = None

    def __post_init__(self):
        for field in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.query_heads is not None and self.query_heads % self.kv_heads:
            raise ValueError(
                f"query_heads ({self.query_heads}) must be a multiple of kv_heads ({self.kv_heads}): "
                "under GQA each K/V head serves the same number of query heads"
            )

    @classmethod
    def from_hf(cls, config, name: str | None = None) -> "KVConfig":
        """From a transformers config (LlamaConfig and alike). num_key_value_heads defaults to the
        number of attention heads (no GQA), head_dim to hidden_size / num_attention_heads."""
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(name or getattr(config, "name_or_path", "") or config.model_type, config.num_hidden_layers, kv_heads, head_dim, heads)

    @property
    def elements_per_token(self) -> int:
        """Numbers cached per token and sequence: 2 x layers x kv_heads x head_dim."""
        return 2 * self.layers * self.kv_heads * self.head_dim


KNOWN_CONFIGS = {  # from the models' published config.json files
    "smollm2-135m": KVConfig("SmolLM2-135M", layers=30, kv_heads=3, head_dim=64, query_heads=9),
    "llama-2-7b": KVConfig("Llama-2-7B", layers=32, kv_heads=32, head_dim=128, query_heads=32),
    "llama-3-8b": KVConfig("Llama-3-8B", layers=32, kv_heads=8, head_dim=128, query_heads=32),
    "llama-2-70b": KVConfig("Llama-2-70B", layers=80, kv_heads=8, head_dim=128, query_heads=64),
}


@dataclass(frozen=True)
class KVScheme:
    """How one layer's K and V are stored.

    kind: "float" (dtype: torch.float32/float16/bfloat16), "int8" (per-token symmetric, fp32
    scales), "fp8" (dtype: torch.float8_e4m3fn or float8_e5m2, one fp32 scale per layer for K and
    for V) or "grouped" (asymmetric `bits`-bit codes with fp16 scale and min per group of
    `group_size`; keys grouped along `key_axis`, values always per token; the newest `residual`
    tokens kept in the model's dtype). bits: the width of one stored code.
    """

    name: str
    kind: Kind
    bits: int
    dtype: torch.dtype | None = None
    group_size: int = 32
    residual: int = 0
    key_axis: Axis = "channel"

    def __post_init__(self):
        if self.kind not in ("float", "int8", "fp8", "grouped"):
            raise ValueError(f"kind must be 'float', 'int8', 'fp8' or 'grouped', got {self.kind!r}")
        if self.kind == "float" and (self.dtype is None or not self.dtype.is_floating_point):
            raise ValueError("a 'float' scheme needs dtype=torch.float32, torch.float16 or torch.bfloat16")
        if self.kind == "fp8" and self.dtype not in FP8_DTYPES:
            raise ValueError("an 'fp8' scheme needs dtype=torch.float8_e4m3fn or torch.float8_e5m2")
        if self.kind == "grouped":
            if self.bits not in PACKABLE_BITS:
                raise ValueError(f"grouped codes are packed into bytes: bits must be one of {PACKABLE_BITS}, got {self.bits}")
            if self.group_size < 1 or self.group_size % (8 // self.bits):
                raise ValueError(
                    f"group_size {self.group_size} must be a positive multiple of {8 // self.bits}: a key group "
                    f"of that many tokens fills whole bytes at {self.bits} bits"
                )
            if self.residual < 0 or self.residual % self.group_size:
                raise ValueError(
                    f"residual {self.residual} must be a multiple of group_size {self.group_size} (KIVI's R), "
                    "so that keys leave the full-precision window in whole groups"
                )
            if self.key_axis not in ("channel", "token"):
                raise ValueError(f"key_axis must be 'channel' (KIVI) or 'token' (naive), got {self.key_axis!r}")


FLOAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def float_scheme(dtype: torch.dtype) -> KVScheme:
    return KVScheme(FLOAT_NAMES[dtype], "float", torch.finfo(dtype).bits, dtype)


SCHEMES = {
    s.name: s
    for s in [
        float_scheme(torch.float32),
        float_scheme(torch.float16),
        KVScheme("int8", "int8", 8),
        KVScheme("fp8_e4m3", "fp8", 8, torch.float8_e4m3fn),
        KVScheme("fp8_e5m2", "fp8", 8, torch.float8_e5m2),
        KVScheme("kivi4", "grouped", 4, group_size=32, residual=128),
        KVScheme("kivi2", "grouped", 2, group_size=32, residual=128),
        KVScheme("kivi2_r0", "grouped", 2, group_size=32, residual=0),
        KVScheme("naive4", "grouped", 4, group_size=32, residual=0, key_axis="token"),
        KVScheme("naive2", "grouped", 2, group_size=32, residual=0, key_axis="token"),
    ]
}


def get_scheme(scheme: "KVScheme | str") -> KVScheme:
    """A scheme by name (see SCHEMES) or the KVScheme itself."""
    if isinstance(scheme, KVScheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown KV-cache scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


# ---------------------------------------------------------------------------------------------
# Memory arithmetic


@dataclass(frozen=True)
class KVMemory:
    """Bytes of a KV cache, split by what they hold."""

    codes: int  # the quantized (or plain float) K/V elements
    constants: int  # scales and minimums
    full_precision: int  # KIVI's residual window, in the model's dtype

    @property
    def total(self) -> int:
        return self.codes + self.constants + self.full_precision


def quantized_tokens(scheme: KVScheme, context: int) -> tuple[int, int]:
    """How many of `context` tokens are held in quantized form, for keys and for values.

    Per-token groups (values; keys of the naive scheme) leave the window one token at a time:
    max(0, T - R). Per-channel key groups leave it in whole groups of G tokens, the oldest first,
    once all G are older than the newest R: G * floor((T - R) / G), so between R and R + G - 1 keys
    stay exact (R = 0: the last incomplete group). Float, int8 and fp8 quantize every token.
    """
    if scheme.kind != "grouped":
        return context, context
    per_token = max(0, context - scheme.residual)
    per_channel = max(0, (context - scheme.residual) // scheme.group_size * scheme.group_size)
    return (per_channel if scheme.key_axis == "channel" else per_token), per_token


def kv_cache_memory(config: KVConfig, scheme: "KVScheme | str", context: int, batch: int = 1, float_bytes: int = 2) -> KVMemory:
    """Exact bytes of the cache for `batch` sequences of `context` tokens.

    float_bytes: width of the full-precision residual (KIVI's window), 2 for an fp16/bf16 model,
    4 for the fp32 reference model here. Constants: int8 one fp32 scale per token and head; fp8
    one fp32 scale per layer for K and for V (independent of batch and context); grouped an fp16
    scale and an fp16 minimum per group of G tokens (keys per channel) or G channels (per token).
    """
    scheme = get_scheme(scheme)
    if context < 0 or batch < 1:
        raise ValueError(f"need context >= 0 and batch >= 1, got context={context}, batch={batch}")
    elements = batch * context * config.elements_per_token
    D, lanes = config.head_dim, batch * config.layers * config.kv_heads  # lanes: (sequence, layer, head)
    if scheme.kind == "float":
        return KVMemory(elements * torch.finfo(scheme.dtype).bits // 8, 0, 0)
    if scheme.kind == "int8":
        return KVMemory(elements, 2 * lanes * context * 4, 0)  # a 4-byte scale per token, head, K/V
    if scheme.kind == "fp8":
        return KVMemory(elements, 2 * config.layers * 4, 0)  # a 4-byte scale per layer for K and V
    if D % scheme.group_size:
        raise ValueError(f"head_dim {D} is not a multiple of group_size {scheme.group_size}: value groups run over channels")
    constant_bytes = 2 * torch.finfo(CONSTANT_DTYPE).bits // 8  # scale and minimum
    codes = constants = exact = 0
    for tq, axis in zip(quantized_tokens(scheme, context), (scheme.key_axis, "token")):
        codes += lanes * tq * D * scheme.bits // 8
        groups = tq // scheme.group_size * D if axis == "channel" else tq * (D // scheme.group_size)
        constants += lanes * groups * constant_bytes
        exact += lanes * (context - tq) * D * float_bytes
    return KVMemory(codes, constants, exact)


def bytes_per_token(config: KVConfig, scheme: "KVScheme | str", context: int, float_bytes: int = 2) -> float:
    """Cache bytes per token of one sequence at `context` tokens, constants and window included."""
    return kv_cache_memory(config, scheme, context, 1, float_bytes).total / context


# ---------------------------------------------------------------------------------------------
# Quantizers


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row of the last axis.

    x: [..., D] float. Returns codes int8 [..., D] in -127..127 and scale float32 [...],
    scale = max|x| / 127 (1 for an all-zero row), x_hat = scale * codes.
    """
    amax = x.float().abs().amax(dim=-1)
    scale, zero = scale_zero_point(-amax, amax, 8, symmetric=True)
    return quantize(x, scale[..., None], zero[..., None], 8, signed=True), scale


def dequantize_int8_per_token(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes int8 [..., D], scale float32 [...] -> float32 [..., D]."""
    return dequantize(codes, scale[..., None], 0.0)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 format: 448 (e4m3fn), 57344 (e5m2)."""
    return torch.finfo(dtype).max


def fp8_scale(amax: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor scale that maps `amax` onto the format's largest value: amax / fp8_max.

    An amax of 0 gives the smallest normal fp32 number, so nothing is divided by zero.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / fp8_max(dtype)).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 codes of x / scale, saturated at +-fp8_max (a plain cast would give inf or NaN).

    x: [...] float, scale: float32 scalar. Returns [...] of `dtype` (float8_e4m3fn or float8_e5m2);
    the cast rounds to the nearest representable value.
    """
    limit = fp8_max(dtype)
    return (x.float() / scale).clamp(-limit, limit).to(dtype)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 codes [...] and their float32 scalar scale -> float32 [...]."""
    return codes.float() * scale


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last axis into bytes, lowest bits first (the layout of
    `packing.pack_uint8`, written here with shifts because the cache packs on every write).

    codes: [..., n] uint8 in 0..2^bits-1, n a multiple of 8/bits. Returns [..., n*bits/8] uint8.
    """
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"{codes.shape[-1]} codes do not fill whole bytes: at {bits} bits the last axis must be a multiple of {per_byte}")
    parts = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = parts[..., 0].clone()
    for k in range(1, per_byte):
        packed |= parts[..., k] << (bits * k)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: [..., m] uint8 -> [..., m*8/bits] uint8."""
    mask = 2**bits - 1
    parts = [(packed >> (bits * k)) & mask for k in range(8 // bits)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


@dataclass
class GroupCodes:
    """Asymmetric group codes along the last axis: x_hat = scale * q + minimum.

    codes: uint8 [..., n * bits / 8] packed; scale, minimum: float16 [..., n / group_size].
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int


def quantize_groups(x: torch.Tensor, bits: int, group_size: int) -> GroupCodes:
    """KIVI's quantizer: groups of `group_size` consecutive elements of the last axis, each with its
    own min and scale = (max - min) / (2^bits - 1); q = clamp(round((x - min) / scale), 0, 2^bits - 1).

    x: [..., n] float, n a multiple of group_size; bits 2, 4 or 8 (the codes are packed into
    bytes). The scale and minimum are rounded to fp16 first and the codes computed with the rounded
    values, so dequantizing reproduces what was optimized.
    """
    n = x.shape[-1]
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}: the codes are packed into whole bytes; got {bits}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"the last axis ({n}) is not a multiple of group_size {group_size!r}: groups must be whole")
    qmin, qmax = quant_range(bits, signed=False)
    groups = x.float().reshape(*x.shape[:-1], n // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / qmax).to(CONSTANT_DTYPE)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale works
    minimum = low.to(CONSTANT_DTYPE)
    q = round_half((groups - minimum.float()[..., None]) / scale.float()[..., None]).clamp(qmin, qmax)
    return GroupCodes(pack_codes(q.to(torch.uint8).reshape(x.shape), bits), scale, minimum, bits, group_size)


def dequantize_groups(g: GroupCodes) -> torch.Tensor:
    """GroupCodes -> float32 [..., n]."""
    q = unpack_codes(g.codes, g.bits).float()
    q = q.reshape(*q.shape[:-1], -1, g.group_size)
    return (q * g.scale.float()[..., None] + g.minimum.float()[..., None]).flatten(-2)


def concat_groups(a: GroupCodes | None, b: GroupCodes, dim: int) -> GroupCodes:
    """Append the groups of `b` after those of `a` along `dim` (a batch-like axis, or -1)."""
    if a is None:
        return b
    parts = (torch.cat([x, y], dim=dim) for x, y in [(a.codes, b.codes), (a.scale, b.scale), (a.minimum, b.minimum)])
    return GroupCodes(*parts, a.bits, a.group_size)


def update_residual_window(
    quantized: GroupCodes | None,
    window: torch.Tensor | None,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    residual: int,
    axis: Axis,
) -> tuple[GroupCodes | None, torch.Tensor]:
    """One write into KIVI's storage: append the new tokens to the full-precision window, then move
    the tokens that are no longer among the newest `residual` into quantized groups, oldest first.

    x: [B, H, t, D] the new tokens. window: [B, H, w, D] the tokens not quantized yet (None before
    the first write); it stays in x's dtype. quantized: the groups so far (None while there are
    none). Returns the new (quantized, window).

    axis "token" (values, and the naive scheme's keys): every token older than the newest R leaves,
    its D channels in groups of G: codes [B, H, Tq, D*bits/8], scale and minimum [B, H, Tq, D/G].
    axis "channel" (KIVI's keys): each channel is grouped over G consecutive tokens, so tokens leave
    only in whole groups of G, once all G are older than the newest R; stored transposed, tokens
    along the last axis: codes [B, H, D, Tq*bits/8], scale and minimum [B, H, D, Tq/G].
    """
    if axis not in ("channel", "token"):
        raise ValueError(f"axis must be 'channel' (KIVI's keys) or 'token' (values), got {axis!r}")
    if residual < 0 or residual % group_size:
        raise ValueError(f"residual {residual} must be a multiple of group_size {group_size}, so that keys leave the window in whole groups")
    window = x if window is None else torch.cat([window, x], dim=-2)
    leaving = max(0, window.shape[-2] - residual)
    if axis == "channel":
        leaving = leaving // group_size * group_size
    if not leaving:
        return quantized, window
    # clone: a view would keep the departed tokens' full-precision storage alive
    old, window = window[..., :leaving, :], window[..., leaving:, :].clone()
    if axis == "channel":  # tokens run along the last axis of the stored codes
        return concat_groups(quantized, quantize_groups(old.transpose(-1, -2).contiguous(), bits, group_size), dim=-1), window
    return concat_groups(quantized, quantize_groups(old, bits, group_size), dim=-2), window


# ---------------------------------------------------------------------------------------------
# Stores: one per K or V tensor of a layer. append() takes [B, H, t, D]; read() returns [B, H, T, D].


class FloatStore:
    """The unquantized cache in `dtype` (DynamicCache's storage when dtype is the model's)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.data = dtype, None

    def append(self, x: torch.Tensor) -> None:
        x = x.to(self.dtype)
        self.data = x if self.data is None else torch.cat([self.data, x], dim=-2)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        return self.data.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]


class Int8Store:
    """Per-token int8: codes int8 [B, H, T, D], scale float32 [B, H, T]."""

    def __init__(self):
        self.codes = self.scale = None

    def append(self, x: torch.Tensor) -> None:
        codes, scale = quantize_int8_per_token(x)
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], dim=-2)
        self.scale = scale if self.scale is None else torch.cat([self.scale, scale], dim=-1)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8_per_token(self.codes, self.scale).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale]


class Fp8Store:
    """Per-tensor fp8: codes [B, H, T, D] of `dtype`, scale float32 [] for the whole layer.

    The scale is given (calibrated offline, vLLM's k_scale / v_scale) or fixed by the first
    non-empty write as its amax / fp8_max (transformers' fp8 cache, vLLM's calculate_kv_scales).
    """

    def __init__(self, dtype: torch.dtype, scale: torch.Tensor | float | None = None):
        self.dtype, self.codes = dtype, None
        self.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32)

    def append(self, x: torch.Tensor) -> None:
        if self.scale is None:
            if not x.numel():
                return  # nothing to size the scale on yet
            self.scale = fp8_scale(x.float().abs().amax(), self.dtype)
        codes = quantize_fp8(x, self.scale, self.dtype)
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], dim=-2)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.codes, self.scale).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale]


class GroupedStore:
    """KIVI-style storage: quantized groups plus a full-precision window of the newest tokens.

    axis "token": each token's D channels in groups of G (KIVI's values, the naive keys); a token
    is quantized as soon as it is older than the newest `residual` tokens.
    axis "channel": each channel in groups of G consecutive tokens (KIVI's keys), stored transposed
    [B, H, D, T]; a group is quantized once all of its G tokens are older than the newest `residual`.
    """

    def __init__(self, bits: int, group_size: int, residual: int, axis: Axis):
        self.bits, self.group_size, self.residual, self.axis = bits, group_size, residual, axis
        self.quantized: GroupCodes | None = None
        self.window = None  # [B, H, t, D] in the incoming dtype

    def append(self, x: torch.Tensor) -> None:
        self.quantized, self.window = update_residual_window(
            self.quantized, self.window, x, self.bits, self.group_size, self.residual, self.axis
        )

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quantized is None:
            return self.window.to(dtype)
        old = dequantize_groups(self.quantized)
        old = old.transpose(-1, -2) if self.axis == "channel" else old
        return torch.cat([old.to(dtype), self.window.to(dtype)], dim=-2)

    def tensors(self) -> list[torch.Tensor]:
        q = [] if self.quantized is None else [self.quantized.codes, self.quantized.scale, self.quantized.minimum]
        return q + [self.window]


def make_store(scheme: KVScheme, which: Literal["key", "value"], fp8_scale_value=None):
    """The store for one layer's K or V: an object with append(x), read(dtype) and tensors()."""
    if scheme.kind == "float":
        return FloatStore(scheme.dtype)
    if scheme.kind == "int8":
        return Int8Store()
    if scheme.kind == "fp8":
        return Fp8Store(scheme.dtype, fp8_scale_value)
    axis = scheme.key_axis if which == "key" else "token"
    return GroupedStore(scheme.bits, scheme.group_size, scheme.residual, axis)


# ---------------------------------------------------------------------------------------------
# The transformers cache


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache in a `KVScheme`: writes quantize, reads dequantize everything.

    `keys` and `values` stay None: nothing unquantized is kept besides KIVI's window.
    stores: the factory of the K and V stores, `make_store` unless another is given (lab 08 plugs
    in stores built from the learner's functions).
    """

    is_croppable = False

    def __init__(self, scheme: KVScheme, key_scale=None, value_scale=None, stores: Callable = make_store):
        super().__init__()
        self.scheme, self.key_scale, self.value_scale, self.stores = scheme, key_scale, value_scale, stores
        self.key_store = self.value_store = None
        self.length = self.batch = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device, self.batch = key_states.dtype, key_states.device, key_states.shape[0]
        head_dim = key_states.shape[-1]
        if self.scheme.kind == "grouped" and head_dim % self.scheme.group_size:
            raise ValueError(
                f"head_dim {head_dim} is not a multiple of group_size {self.scheme.group_size}: KIVI groups "
                "the values' channels, so pick a group size that divides the head dimension"
            )
        self.key_store = self.stores(self.scheme, "key", self.key_scale)
        self.value_store = self.stores(self.scheme, "value", self.value_scale)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new states [B, H, t, D], return all cached K and V dequantized [B, H, T, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.key_store.append(key_states)
        self.value_store.append(value_states)
        self.length += key_states.shape[-2]
        return self.key_store.read(self.dtype), self.value_store.read(self.dtype)

    def get_seq_length(self) -> int:
        return self.length

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for s in (self.key_store, self.value_store) for t in s.tensors() if t is not None)

    def reset(self) -> None:
        self.key_store = self.value_store = None
        self.length = self.batch = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a quantized KV cache cannot be cropped (quantized groups cannot give back single tokens); "
            "do not use assisted or speculative decoding with it"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by QuantizedKVCache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("QuantizedKVCache does not support repeating the batch (contrastive search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("QuantizedKVCache does not support selecting batch rows (contrastive search)")


class QuantizedKVCache(Cache):
    """A transformers Cache that stores K and V in a `KVScheme` (see the module docstring).

    config: the model's config (its num_hidden_layers layers are created). fp8_scales: optional
    float32 [layers, 2] per-layer (K, V) scales for an fp8 scheme (`fp8_scale(calibrate_kv_amax(...))`); without
    them each layer's scale is fixed by its first write. Pass it to `model(..., past_key_values=)`
    or `model.generate(..., past_key_values=)`. stores: see `QuantizedKVLayer`.
    """

    def __init__(self, config, scheme: "KVScheme | str", fp8_scales: torch.Tensor | None = None, stores: Callable = make_store):
        self.scheme = get_scheme(scheme)
        layers = config.get_text_config(decoder=True).num_hidden_layers
        if fp8_scales is not None and (self.scheme.kind != "fp8" or tuple(fp8_scales.shape) != (layers, 2)):
            raise ValueError(f"fp8_scales must be a [{layers}, 2] tensor (K and V scale per layer) and needs an fp8 scheme")
        scale = (lambda i, j: None) if fp8_scales is None else (lambda i, j: fp8_scales[i, j])
        super().__init__(layers=[QuantizedKVLayer(self.scheme, scale(i, 0), scale(i, 1), stores) for i in range(layers)])

    def nbytes(self) -> int:
        """Bytes held by all layers: codes, constants and full-precision window, measured."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Measured bytes per cached token of one sequence."""
        return self.nbytes() / (self.get_seq_length() * self.layers[0].batch)


# ---------------------------------------------------------------------------------------------
# Evaluation on the model


@torch.inference_mode()
def calibrate_kv_amax(model, windows: torch.Tensor) -> torch.Tensor:
    """Largest |K| and |V| of each layer over calibration windows [n, L]: float32 [layers, 2].

    `fp8_scale(amax, dtype)` turns them into per-layer fp8 scales, the way llm-compressor produces
    the k_scale / v_scale that vLLM reads from a checkpoint.
    """
    cache = DynamicCache(config=model.config)
    model(windows, past_key_values=cache, use_cache=True)
    return torch.tensor([[layer.keys.abs().amax(), layer.values.abs().amax()] for layer in cache.layers])


@dataclass
class Tally:
    """Running sums for one scheme: negative log-likelihood, KLD, top-1 agreement, count."""

    nll: float = 0.0
    kld: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, logp: torch.Tensor, logq: torch.Tensor, targets: torch.Tensor) -> None:
        """logp (reference), logq: [n, vocab] float32 log-probs; targets [n] the next tokens."""
        self.nll -= logq.gather(1, targets[:, None]).double().sum().item()
        self.kld += (logp.exp() * (logp - logq)).sum(dim=-1).double().sum().item()
        self.agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
        self.count += targets.numel()

    def summary(self) -> dict:
        return {"ppl": math.exp(self.nll / self.count), "kld": self.kld / self.count,
                "top1_agreement": self.agree / self.count, "tokens": self.count}  # fmt: skip


@torch.inference_mode()
def score_schemes(
    model,
    windows: torch.Tensor,
    schemes: Iterable["KVScheme | str"],
    chunk_size: int = 32,
    fp8_scales: dict[str, torch.Tensor] | None = None,
    progress=None,
) -> dict[str, dict]:
    """Perplexity, KLD and top-1 agreement of each scheme against the fp32 cache, at the windows'
    full context, fed through the cache in chunks (see the module docstring).

    windows: [n, L] int64. The fp32 cache (`QuantizedKVCache` with "fp32", equal to DynamicCache)
    runs in lock step, chunk by chunk, so only [chunk_size, vocab] logits are alive at a time.
    Every window position but the last is scored. Also returned: the same metrics over the second
    half of each window (positions L/2 .. L-2, whose context is at least L/2 tokens) and the cache
    bytes per token measured after each window. fp8_scales: scheme name -> [layers, 2] scales.
    The "fp32" scheme, if asked for, is the reference run itself (KLD 0, its perplexity the
    reference perplexity): it is not run twice.
    """
    schemes = [get_scheme(s) for s in schemes]
    fp8_scales = fp8_scales or {}
    n, L = windows.shape
    tallies = {s.name: (Tally(), Tally()) for s in schemes}
    measured = {s.name: [] for s in schemes}
    for w, window in enumerate(windows):
        reference = QuantizedKVCache(model.config, "fp32")
        caches = {s.name: reference if s == SCHEMES["fp32"] else QuantizedKVCache(model.config, s, fp8_scales.get(s.name))
                  for s in schemes}  # fmt: skip
        for start in range(0, L, chunk_size):
            chunk = window[None, start : start + chunk_size]
            positions = torch.arange(start, start + chunk.shape[1])
            scored = positions < L - 1
            targets = window[positions[scored] + 1]
            late = positions[scored] >= L // 2
            logp = F.log_softmax(model(chunk, past_key_values=reference, use_cache=True).logits[0, scored].float(), -1)
            for s in schemes:
                if caches[s.name] is reference:
                    logq = logp
                else:
                    logits = model(chunk, past_key_values=caches[s.name], use_cache=True).logits[0, scored]
                    logq = F.log_softmax(logits.float(), -1)
                everything, second_half = tallies[s.name]
                everything.add(logp, logq, targets)
                if late.any():
                    second_half.add(logp[late], logq[late], targets[late])
            if progress:
                progress(w, start + chunk.shape[1], L)
        for s in schemes:
            measured[s.name].append(caches[s.name].bytes_per_token())
    results = {}
    for s in schemes:
        everything, second_half = tallies[s.name]
        late = {f"{k}_second_half": v for k, v in second_half.summary().items()}
        results[s.name] = {**everything.summary(), **late, "bytes_per_token": sum(measured[s.name]) / n}
    return results


@torch.inference_mode()
def greedy_generate(model, prompt: torch.Tensor, cache: Cache, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of prompt [L] int64 through `model.generate` with the given cache.

    Exactly `new_tokens` tokens (end-of-sequence does not stop it). Returns [new_tokens] int64.
    """
    out = model.generate(
        prompt[None], attention_mask=torch.ones_like(prompt[None]), past_key_values=cache, do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id,
    )  # fmt: skip
    return out[0, prompt.numel() :]


def generation_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Token-by-token comparison of two greedy continuations [n]: the share of positions with the
    same token, and how many tokens match before the first difference."""
    same = reference == other
    prefix = int(same.long().cumprod(0).sum())
    return {"same_tokens": same.float().mean().item(), "identical_prefix": prefix}
