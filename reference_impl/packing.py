"""Bit packing: several low-bit codes in one machine word, in the layouts real checkpoints use.

A 4-bit code in a uint8 tensor wastes half of every byte. Packing lays the codes one after
another in a stream of bits, lowest bits first, and cuts the stream into words:

    code k occupies bits [b*k, b*k + b) of the stream; word w holds stream bits [32w, 32w + 32)

For b = 2, 4, 8 every word holds exactly 32/b whole codes. For b = 3, 32 codes fill exactly
3 words (96 bits), and two of those codes straddle a word boundary:

    word 0: codes 0-9 at bits 0..29, the low 2 bits of code 10 at bits 30-31
    word 1: the high bit of code 10 at bit 0, codes 11-20 at bits 1..30, low bit of code 21 at 31
    word 2: the high 2 bits of code 21 at bits 0-1, codes 22-31 at bits 2..31

That is GPTQ's checkpoint layout (AutoGPTQ "v1"): qweight int32 [K*b/32, N], packed along K,
the input dimension (rows of the transposed weight W^T [K, N]). qzeros [groups, N*b/32] packs the
same way along N, `pack_int32((zeros - 1).T, b).T`: v1 stores each zero point minus 1.

bitsandbytes packs its 4-bit NF4/FP4 codes the other way round inside a byte: two codes per byte,
the first in the high nibble (`pack_nibbles_bnb`).
"""

import math

import torch

INT32_BITS = (2, 3, 4, 8)
UINT8_BITS = (2, 4, 8)


def codes_per_chunk(bits: int, word_bits: int) -> int:
    """Fewest codes that end exactly on a word boundary: lcm(bits, word_bits) / bits.

    32 / 4 = 8 codes for 4 bits in int32, 32 for 3 bits (in 3 words), 2 for 4 bits in a byte.
    """
    return word_bits // math.gcd(bits, word_bits)


def check_codes(codes: torch.Tensor, bits: int, supported: tuple[int, ...]) -> None:
    """Refuse unsupported widths, non-uint8 codes and codes that do not fit in `bits` bits."""
    if bits not in supported:
        raise ValueError(f"bits must be one of {supported} for this layout, got {bits!r}")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        hint = (
            f"; codes of a signed grid go in shifted by 2^(bits-1) = {2 ** (bits - 1)}, "
            "which is how GPTQ stores a symmetric grid (zero point 2^(bits-1))"
            if got == torch.int8
            else ""
        )
        raise TypeError(f"codes must be a uint8 tensor of unsigned codes, got {got}{hint}")
    largest = int(codes.max()) if codes.numel() else 0  # a Python int: 2^8 does not fit in uint8
    if largest >= 2**bits:
        raise ValueError(
            f"codes must be in 0..{2**bits - 1} for {bits} bits, got a maximum of {largest}; "
            "quantize to the unsigned grid of that width first"
        )


def check_length(length: int, bits: int, word_bits: int, what: str) -> None:
    """The packed dimension must fill whole words: a multiple of `codes_per_chunk`."""
    chunk = codes_per_chunk(bits, word_bits)
    if length % chunk:
        raise ValueError(
            f"{what} = {length} is not a multiple of {chunk}: {word_bits}-bit words hold {bits}-bit "
            f"codes in whole chunks of {chunk} codes ({chunk * bits // word_bits} word(s)). Pad {what} "
            f"with zero codes up to {math.ceil(length / chunk) * chunk}."
        )


def stream_positions(length: int, bits: int, word_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For codes 0..length-1: the word each starts in, its shift there, and whether it spills
    into the next word. Returns (word int64, shift int64, spill bool), each [length]."""
    start = bits * torch.arange(length, dtype=torch.int64)  # first stream bit of each code
    word, shift = start // word_bits, start % word_bits
    return word, shift, shift + bits > word_bits


def pack_stream(codes: torch.Tensor, bits: int, word_bits: int) -> torch.Tensor:
    """codes: [K, N] uint8 -> words [K*bits/word_bits, N] int64 holding unsigned word values."""
    K, N = codes.shape
    word, shift, spill = stream_positions(K, bits, word_bits)
    c = codes.to(torch.int64)
    words = torch.zeros(K * bits // word_bits, N, dtype=torch.int64)
    # The codes' bit fields never overlap, so adding them is the same as OR-ing them in.
    words.index_add_(0, word, (c << shift[:, None]) & (2**word_bits - 1))
    high_part = c[spill] >> (word_bits - shift[spill])[:, None]  # the bits that did not fit
    words.index_add_(0, word[spill] + 1, high_part)
    return words


def unpack_stream(words: torch.Tensor, bits: int, word_bits: int, K: int) -> torch.Tensor:
    """words: [K*bits/word_bits, N] int64 unsigned word values -> codes [K, N] uint8."""
    word, shift, spill = stream_positions(K, bits, word_bits)
    mask = 2**bits - 1
    codes = (words[word] >> shift[:, None]) & mask
    high_part = (words[word[spill] + 1] << (word_bits - shift[spill])[:, None]) & mask
    codes[spill] |= high_part
    return codes.to(torch.uint8)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along K into GPTQ's int32 words, lowest bits first.

    codes: [K, N] uint8 in 0..2^bits-1, K a multiple of 32/bits (of 32 for 3 bits).
    Returns [K*bits/32, N] int32. int32 is signed: a word whose bit 31 is set (a 4-bit code >= 8
    in the last slot, say) reads as a negative number; the bits are the same.
    """
    check_codes(codes, bits, INT32_BITS)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [K, N] (the transposed weight), got shape {tuple(codes.shape)}")
    check_length(codes.shape[0], bits, 32, "K")
    words = pack_stream(codes, bits, 32)
    # Two's complement: an unsigned word u >= 2^31 is stored as the int32 u - 2^32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of `pack_int32`: packed [K*bits/32, N] int32 -> codes [K, N] uint8."""
    if bits not in INT32_BITS:
        raise ValueError(f"bits must be one of {INT32_BITS} for this layout, got {bits!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError("packed must be a 2-D int32 tensor [K*bits/32, N], like GPTQ's qweight")
    check_length(K, bits, 32, "K")
    if packed.shape[0] * 32 != K * bits:
        raise ValueError(
            f"{K} codes of {bits} bits fill {K * bits // 32} int32 words per column, but packed has "
            f"{packed.shape[0]} rows; check K and bits (packed holds {packed.shape[0] * 32 // bits} codes)"
        )
    words = packed.to(torch.int64) & 0xFFFFFFFF  # read each word as unsigned 32 bits
    return unpack_stream(words, bits, 32, K)


def pack_uint8(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension into bytes, lowest bits first.

    codes: [..., n] uint8 in 0..2^bits-1, n a multiple of 8/bits. Returns [..., n*bits/8] uint8;
    at 4 bits byte j = codes[2j] | codes[2j+1] << 4 (the first code in the LOW nibble).
    """
    check_codes(codes, bits, UINT8_BITS)
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension to pack along")
    check_length(codes.shape[-1], bits, 8, "the last dimension")
    rows = codes.reshape(-1, codes.shape[-1]).T  # pack_stream packs along dim 0
    packed = pack_stream(rows, bits, 8).T.to(torch.uint8)
    return packed.reshape(*codes.shape[:-1], -1)


def unpack_uint8(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_uint8`: [..., m] uint8 -> codes [..., m*8/bits] uint8."""
    if bits not in UINT8_BITS:
        raise ValueError(f"bits must be one of {UINT8_BITS} for this layout, got {bits!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() == 0:
        raise TypeError("packed must be a uint8 tensor with at least one dimension")
    n = packed.shape[-1] * 8 // bits
    rows = packed.reshape(-1, packed.shape[-1]).T.to(torch.int64)
    return unpack_stream(rows, bits, 8, n).T.reshape(*packed.shape[:-1], n)


def pack_nibbles_bnb(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte in bitsandbytes' order: byte j = codes[2j] << 4 | codes[2j+1].

    codes: [..., n] uint8 in 0..15, n even. Returns [..., n/2] uint8. bitsandbytes packs the
    flattened tensor and stores it as [numel/2, 1]: `pack_nibbles_bnb(codes.flatten())[:, None]`.
    """
    check_codes(codes, 4, (4,))
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(
            f"the last dimension must be even (two codes per byte), got shape {tuple(codes.shape)}; "
            "pad with one zero code"
        )
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles_bnb(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles_bnb`: [..., m] uint8 -> codes [..., 2m] uint8."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() == 0:
        raise TypeError("packed must be a uint8 tensor with at least one dimension")
    high, low = packed >> 4, packed & 0x0F
    return torch.stack([high, low], dim=-1).reshape(*packed.shape[:-1], -1)
