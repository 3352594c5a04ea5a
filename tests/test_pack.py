"""Dense int32 packing: exact round trips, a bit-by-bit reference, the compressed-tensors layout, bad input."""

import pytest
import torch

from lightning_tlq.core.pack import pack_int32, packed_length, to_signed, to_unsigned, unpack_int32

BITS = range(1, 9)
SHAPES = [(1, 1), (3, 31), (5, 32), (4, 33), (7, 100), (16, 128)]


def _reference_pack(codes, bits):
    """Bit by bit along dim 1: element i of a row sets bits bits*i ... of the row's little-endian bit stream."""
    rows, n = codes.shape
    words = [[0] * packed_length(n, bits) for _ in range(rows)]
    for r in range(rows):
        for i in range(n):
            for b in range(bits):
                if (int(codes[r, i]) >> b) & 1:
                    pos = bits * i + b
                    words[r][pos // 32] |= 1 << (pos % 32)
    as_signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]
    return torch.tensor(as_signed, dtype=torch.int32).reshape(rows, -1)


def _codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_exact_along_both_dims(bits, shape):
    codes = _codes(shape, bits)
    for dim in (0, 1):
        packed = pack_int32(codes, bits, dim=dim)
        assert packed.dtype == torch.int32
        assert packed.shape[dim] == packed_length(shape[dim], bits)
        assert packed.shape[1 - dim] == shape[1 - dim]
        out = unpack_int32(packed, bits, shape[dim], dim=dim)
        assert out.dtype == torch.uint8
        assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_matches_a_bit_by_bit_reference(bits):
    codes = _codes((3, 70), bits, seed=bits)
    assert torch.equal(pack_int32(codes, bits), _reference_pack(codes, bits))
    # dim 0 packs the transpose
    assert torch.equal(pack_int32(codes.t(), bits, dim=0), _reference_pack(codes, bits).t())


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_and_sign_bit(bits):
    top = (1 << bits) - 1
    codes = torch.tensor([[top] * 64, [0] * 64, [top, 0] * 32])
    packed = pack_int32(codes, bits)
    assert torch.equal(unpack_int32(packed, bits, 64).long(), codes)
    if bits in (1, 2, 4, 8):  # all-ones rows fill every word: -1 in two's complement
        assert (packed[0] == -1).all()
    assert (packed[1] == 0).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_divisors_of_32_keep_the_per_word_layout(bits):
    """For 2/4/8 bits the dense layout is the older "32 // bits codes per word" one: word w holds elements
    w*k .. w*k+k-1 at bit offsets 0, bits, 2*bits, ..."""
    k = 32 // bits
    codes = _codes((2, 3 * k + 1), bits, seed=7)
    packed = pack_int32(codes, bits)
    for w in range(packed.shape[1]):
        word = int(packed[0, w]) & 0xFFFFFFFF
        for j in range(k):
            i = w * k + j
            expect = int(codes[0, i]) if i < codes.shape[1] else 0
            assert (word >> (bits * j)) & ((1 << bits) - 1) == expect


def test_known_words():
    # 4-bit codes 1..8 -> nibbles from the least significant end
    assert pack_int32(torch.arange(1, 9).reshape(1, 8), 4).item() == 0x87654321 - (1 << 32)
    # 3-bit: eleven codes of 7 fill bits 0..32 -> word 0 all ones, word 1 bit 0 set
    assert pack_int32(torch.full((1, 11), 7), 3).tolist() == [[-1, 1]]


@pytest.mark.parametrize("bits", BITS)
def test_signed_offset_round_trip(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    signed = torch.arange(lo, hi + 1).reshape(1, -1).to(torch.int8)
    unsigned = to_unsigned(signed, bits)
    assert unsigned.min() == 0
    assert unsigned.max() == (1 << bits) - 1
    assert torch.equal(to_signed(unsigned, bits).to(torch.int8), signed)


def test_bad_input_fails_loudly():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="to_unsigned"):
        pack_int32(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError, match="integer codes"):
        pack_int32(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="1..8"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="2-D"):
        pack_int32(torch.zeros(2, 2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="int32"):
        unpack_int32(torch.zeros(2, 2, dtype=torch.int64), 4, 16)
    with pytest.raises(ValueError, match="cannot hold exactly 17"):
        unpack_int32(torch.zeros(2, 2, dtype=torch.int32), 4, 17)


@pytest.mark.parametrize("bits", BITS)
def test_agrees_with_compressed_tensors(bits):
    """The real client's packer and unpacker read and write the same words (signed int8 codes, offset inside)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = _codes((6, 77), bits, seed=3)
    signed = to_signed(codes, bits).to(torch.int8)
    for dim in (0, 1):
        ours = pack_int32(codes, bits, dim=dim)
        theirs = helpers.pack_to_int32(signed, bits, packed_dim=dim)
        assert torch.equal(ours, theirs)
        back = helpers.unpack_from_int32(ours, bits, codes.shape, packed_dim=dim)
        assert torch.equal(back, signed)
