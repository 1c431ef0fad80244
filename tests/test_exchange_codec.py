"""The exchange codec alone: wire format, round-trip error bounds, residual error feedback, state."""

import pytest
import torch

from python_backend.core.exchange_codec import (
    ALLOWED_VALUES,
    MIN_COMPRESSED_BYTES,
    CodecSpec,
    ExchangeCodec,
    channel_axis,
    compression_ratio,
    dequantize,
    dequantize_two_level,
    pack,
    quantize,
    quantize_two_level,
    should_compress,
    unpack,
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = (2, 256, 64)  # [B, T, C] attention K/V, 128 KiB in float32
HALO = (2, 40, 2, 224)  # [B, C, rows, W] conv halo payload
LEVELS = {"int8": 127, "int4": 7}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _pair(text: str) -> tuple[ExchangeCodec, ExchangeCodec]:
    spec = CodecSpec.parse(text)
    return ExchangeCodec(spec, 0, 2), ExchangeCodec(spec, 1, 2)


def _send(sender: ExchangeCodec, receiver: ExchangeCodec, key: str, fresh: torch.Tensor) -> torch.Tensor:
    return receiver.decode(key, sender.index, sender.encode(key, fresh), fresh.shape, fresh.dtype)


def _per_channel_scales(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Scales broadcastable against ``x``: max|x| over everything but the channel axis / levels."""
    axis = channel_axis(x.shape)
    reduced = [d for d in range(x.ndim) if d != axis]
    return x.float().abs().amax(dim=reduced, keepdim=True) / levels


def _channels_of_mixed_magnitude(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axis = channel_axis(shape)
    magnitude_shape = [1] * len(shape)
    magnitude_shape[axis] = shape[axis]
    magnitudes = torch.logspace(-3, 2, shape[axis]).view(magnitude_shape)
    return (torch.randn(shape, generator=g) * magnitudes).to(dtype)


# --- parsing ---


@pytest.mark.parametrize("text", ALLOWED_VALUES)
def test_parse_round_trips_every_allowed_value(text):
    spec = CodecSpec.parse(f"  {text.upper()} ")
    assert spec.text == text == str(spec)
    assert spec.residual == text.endswith("+residual")
    assert spec.lossless == (text == "native")


@pytest.mark.parametrize("text", ["int4", "native+residual", "float32", "int8+delta", "", "int8+residual+x"])
def test_parse_errors_name_the_option_and_the_choices(text):
    with pytest.raises(ValueError) as error:
        CodecSpec.parse(text)
    message = str(error.value)
    assert "--exchange-dtype" in message
    assert all(value in message for value in ALLOWED_VALUES)
    if text == "int4":
        assert "int4+residual" in message and "too coarse" in message


def test_spec_constructor_validates_too():
    with pytest.raises(ValueError, match="--exchange-dtype"):
        CodecSpec("int4", False)
    assert CodecSpec() == CodecSpec.parse("native")


# --- rules ---


def test_channel_axis_rule():
    assert channel_axis((2, 320, 2, 128)) == 1  # conv halo NCHW
    assert channel_axis((2, 4096, 1280)) == 2  # attention K/V [B, T, C]
    assert channel_axis((2, 2, 32, 1, 1)) is None
    assert channel_axis((4096,)) is None
    assert channel_axis((64, 64)) is None


def test_should_compress_rule():
    assert should_compress((2, 4096, 1280), torch.float16)
    assert should_compress((2, 320, 2, 128), torch.float32)
    assert should_compress(TOKENS, torch.bfloat16)
    # GroupNorm moments [2, B, G] in float32: tiny, precision-critical, exact
    assert not should_compress((2, 2, 32), torch.float32)
    assert not should_compress((2, 128, 32), torch.float32)
    # size threshold, counted in source bytes
    assert should_compress((1, MIN_COMPRESSED_BYTES // 4, 1), torch.float32)
    assert not should_compress((1, MIN_COMPRESSED_BYTES // 4 - 1, 1), torch.float32)
    assert not should_compress((1, MIN_COMPRESSED_BYTES // 4, 1), torch.float16)
    assert should_compress((1, 8, 4), torch.float32, min_bytes=128)
    # only float32/16/bf16 buffers of rank 3 or 4
    assert not should_compress((2, 4096, 1280), torch.float64)
    assert not should_compress((2, 4096, 1280), torch.int32)
    assert not should_compress((4096, 1280), torch.float32)


def test_a_float_format_only_compresses_a_wider_source():
    assert CodecSpec.parse("float16").compresses(TOKENS, torch.float32)
    assert not CodecSpec.parse("float16").compresses(TOKENS, torch.float16)
    assert not CodecSpec.parse("float16").compresses(TOKENS, torch.bfloat16)  # lossy, no smaller
    assert not CodecSpec.parse("bfloat16+residual").compresses(TOKENS, torch.float16)
    assert CodecSpec.parse("int8").compresses(TOKENS, torch.bfloat16)
    assert not CodecSpec.parse("native").compresses(TOKENS, torch.float32)


def test_compression_ratios():
    kv = (2, 4096, 640)
    assert compression_ratio(CodecSpec.parse("native"), kv, torch.float32) == 1
    assert compression_ratio(CodecSpec.parse("float16"), kv, torch.float32) == 2
    assert compression_ratio(CodecSpec.parse("int8"), kv, torch.float32) == pytest.approx(4, rel=1e-3)
    assert compression_ratio(CodecSpec.parse("int8"), kv, torch.float16) == pytest.approx(2, rel=1e-3)
    # int4: half a byte a value, and float32 scales per channel (640) and per token (2 x 4096)
    int4_bytes = 2 * 4096 * 640 // 2 + 4 * (640 + 2 * 4096)
    assert compression_ratio(CodecSpec.parse("int4+residual"), kv, torch.float16) == 2 * 4096 * 640 * 2 / int4_bytes
    assert compression_ratio(CodecSpec.parse("int4+residual"), kv, torch.float16) > 3.9
    # halo rows travel as int8 under int4 (their error shows at the seams)
    assert CodecSpec.parse("int4+residual").format_for(HALO) == "int8"
    assert CodecSpec.parse("int4+residual").wire_nbytes(HALO, torch.float16) == CodecSpec.parse("int8").wire_nbytes(
        HALO, torch.float16)
    assert compression_ratio(CodecSpec.parse("int4+residual"), (2, 2, 32), torch.float32) == 1  # exact


# --- wire format ---


@pytest.mark.parametrize("text", ALLOWED_VALUES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [TOKENS, HALO, (1, 8193, 5), (2, 2, 32)])  # odd numel, tiny moments
def test_wire_length_matches_wire_nbytes_whatever_the_values(text, dtype, shape):
    spec = CodecSpec.parse(text)
    expected = spec.wire_nbytes(shape, dtype)
    fills = [torch.zeros(shape), torch.randn(shape) * 1e3, torch.full(shape, -1e-30), torch.randn(shape)]
    for fill in fills:
        wire = ExchangeCodec(spec, 0, 2).encode("k", fill.to(dtype))
        assert wire.dtype == torch.uint8 and wire.ndim == 1 and wire.numel() == expected


@pytest.mark.parametrize("text", ALLOWED_VALUES)
def test_wire_length_on_the_meta_device(text):
    spec = CodecSpec.parse(text)
    sender, receiver = ExchangeCodec(spec, 0, 2), ExchangeCodec(spec, 1, 2)
    for shape, dtype in [(TOKENS, torch.bfloat16), (HALO, torch.float32), ((1, 8193, 5), torch.float16)]:
        fresh = torch.empty(shape, dtype=dtype, device="meta")
        for _ in range(2):  # first use and a residual step
            wire = sender.encode("k", fresh)
            assert wire.device.type == "meta" and wire.numel() == spec.wire_nbytes(shape, dtype)
            decoded = receiver.decode("k", 0, wire, shape, dtype)
            assert decoded.shape == shape and decoded.dtype == dtype and decoded.device.type == "meta"


def test_int8_layout_values_then_aligned_float32_scales():
    x = torch.randn(1, 8193, 3)
    wire = pack(x, CodecSpec.parse("int8"))
    q, scales = quantize(x, 127)
    assert torch.equal(wire[: x.numel()].view(torch.int8), q.reshape(-1))
    start = -(-x.numel() // 4) * 4  # 24579 values, then 1 zero byte, then the scales
    assert torch.all(wire[x.numel() : start] == 0)
    assert torch.equal(wire[start:].view(torch.float32), scales)


def test_int4_nibbles_two_values_a_byte_then_channel_and_token_scales():
    # channel maxima 7 and 2; token 1 reaches its channel's max, token 2 half of it, token 3 is zero
    x = torch.tensor([[[-7.0, 2.0], [3.5, -0.6], [0.0, 0.0]]])
    wire = pack(x, CodecSpec.parse("int4+residual"))
    q, channel, token = quantize_two_level(x, 7)
    assert q.reshape(-1).tolist() == [-7, 7, 7, -4, 0, 0]  # -0.6 / 2 / (0.5 / 7) = -4.2
    assert wire[:3].tolist() == [(-7 + 8) | ((7 + 8) << 4), (7 + 8) | ((-4 + 8) << 4), 8 | (8 << 4)]
    assert torch.all(wire[3:4] == 0)  # to a float32 boundary
    assert wire[4:].view(torch.float32).tolist() == pytest.approx([7.0, 2.0, 1 / 7, 0.5 / 7, 0.0])
    decoded = unpack(wire, x.shape, x.dtype, CodecSpec.parse("int4+residual"))
    assert torch.equal(decoded, dequantize_two_level(q, channel, token))
    assert torch.allclose(decoded, torch.tensor([[[-7.0, 2.0], [3.5, -4 / 7], [0.0, 0.0]]]), atol=1e-6)


def test_int4_token_scales_keep_a_quiet_token_when_another_changes_a_lot():
    """Per-channel scales alone size every token's levels by the loudest token; the token scale gives a
    quiet token levels of its own."""
    x = torch.randn(1, 64, 32) * 1e-2
    x[0, 0] = 10.0  # one token changes a lot in every channel
    spec = CodecSpec.parse("int4+residual")
    decoded = unpack(pack(x, spec), x.shape, x.dtype, spec)
    quiet = slice(1, None)
    assert _rel(decoded[:, quiet], x[:, quiet]) < 0.2  # per-channel scales alone would round them all to 0
    assert torch.allclose(decoded[:, 0], x[:, 0])


def test_encode_into_a_preallocated_slot_and_decode_from_an_unaligned_one():
    spec = CodecSpec.parse("int8")
    x = torch.randn(TOKENS)
    n = spec.wire_nbytes(x.shape, x.dtype)
    bundle = torch.full((n + 3,), 255, dtype=torch.uint8)
    wire = ExchangeCodec(spec, 0, 2).encode("k", x, out=bundle[1 : n + 1])
    assert wire.data_ptr() == bundle[1:].data_ptr() and bundle[0] == 255 and bundle[n + 1] == 255
    direct = ExchangeCodec(spec, 1, 2).decode("k", 0, pack(x, spec), x.shape, x.dtype)
    from_slot = ExchangeCodec(spec, 1, 2).decode("k", 0, bundle[1:], x.shape, x.dtype)  # odd offset, longer slot
    assert torch.equal(direct, from_slot)


# --- one-shot round trips ---


@pytest.mark.parametrize("text", ["float16", "bfloat16"])
def test_float_formats_are_exact_to_the_cast(text):
    target = {"float16": torch.float16, "bfloat16": torch.bfloat16}[text]
    x = torch.randn(TOKENS) * 10
    decoded = _send(*_pair(text), "k", x)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, x.to(target).to(torch.float32))


def test_float16_clamps_instead_of_overflowing():
    x = torch.randn(TOKENS)
    x[0, 0, 0], x[0, 0, 1] = 1e6, -1e6
    decoded = _send(*_pair("float16"), "k", x)
    assert torch.isfinite(decoded).all() and decoded[0, 0, 0] == 65504 and decoded[0, 0, 1] == -65504


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", [TOKENS, HALO])
def test_integer_formats_err_at_most_half_a_scale_per_channel(fmt, shape):
    x = _channels_of_mixed_magnitude(shape)  # per-channel scales matter: magnitudes span 1e-3..1e2
    spec = CodecSpec.parse("int8" if fmt == "int8" else "int4+residual")
    decoded = _send(ExchangeCodec(spec, 0, 2), ExchangeCodec(spec, 1, 2), "k", x)  # first use: whole value
    scales = _per_channel_scales(x, LEVELS[fmt])
    assert torch.all((decoded - x).abs() <= scales * (0.5 + 1e-5))
    # a per-tensor scale would wipe out the small channels; per-channel keeps them
    axis = channel_axis(shape)
    smallest = x.narrow(axis, 0, 1)
    assert _rel(decoded.narrow(axis, 0, 1), smallest) < (0.02 if fmt == "int8" else 0.3)


@pytest.mark.parametrize("text", ALLOWED_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_decode_to_their_dtype(text, dtype):
    x = torch.randn(TOKENS).to(dtype)
    sender, receiver = _pair(text)
    for _ in range(2):
        decoded = _send(sender, receiver, "k", x)
        assert decoded.dtype == dtype and decoded.shape == x.shape
    assert _rel(decoded, x) < (0.2 if text.startswith("int4") else 0.01)


@pytest.mark.parametrize("text", ALLOWED_VALUES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_and_constant_channels_decode_without_nan(text, dtype):
    zero = torch.zeros(HALO, dtype=dtype)
    constant = torch.randn(HALO)
    constant[:, 0] = 0.0  # all-zero channel: zero scale
    constant[:, 1] = 3.0
    constant[:, 2] = -1e-20  # below float16's range: rounds to zero there
    constant = constant.to(dtype)
    sender, receiver = _pair(text)
    for x in (zero, constant, constant):
        decoded = _send(sender, receiver, "k", x)
        assert torch.isfinite(decoded).all()
    assert torch.all(_send(*_pair(text), "z", zero) == 0)
    assert torch.all(decoded[:, 0] == 0)
    assert torch.allclose(decoded[:, 1].float(), torch.full_like(decoded[:, 1].float(), 3.0), rtol=1e-2)


def test_buffers_too_small_to_compress_travel_exact_and_hold_no_state():
    moments = torch.randn(2, 2, 32)
    sender, receiver = _pair("int4+residual")
    wire = sender.encode("gn", moments)
    assert torch.equal(wire, moments.view(torch.uint8).reshape(-1))
    assert torch.equal(receiver.decode("gn", 0, wire, moments.shape, moments.dtype), moments)
    sender.observe_exact("gn", [moments, moments])
    assert sender.reference("gn") is None and receiver.reconstruction("gn", 0) is None


# --- residual with error feedback ---


def _drifting(shape, steps, dtype=torch.float32, drift=0.01, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for _ in range(steps):
        yield x.to(dtype)
        x = x + drift * torch.randn(shape, generator=g)


def _without_feedback(spec: CodecSpec, sequence, start: torch.Tensor):
    """Receiver errors when the sender sends Q(x_k - x_{k-1}) (its true previous value, not what the
    receiver holds) and the receiver accumulates: the variant error feedback replaces."""
    previous, held, errors = start.float(), start.float(), []
    for x in sequence:
        delta = x.float() - previous
        held = held + unpack(pack(delta, spec), x.shape, x.dtype, spec).float()
        previous = x.float()
        errors.append(_rel(held, x))
    return errors


@pytest.mark.parametrize("text", ["int8+residual", "int4+residual", "float16+residual"])
def test_error_feedback_keeps_a_drifting_buffer_bounded(text):
    spec = CodecSpec.parse(text)
    sender, receiver = ExchangeCodec(spec, 0, 2), ExchangeCodec(spec, 1, 2)
    sequence = list(_drifting(TOKENS, 21))
    sender.observe_exact("kv", [sequence[0], sequence[0]])  # as after the exact warm-up steps
    receiver.observe_exact("kv", [sequence[0], sequence[0]])
    errors = []
    for x in sequence[1:]:
        before = sender.reference("kv").clone()
        decoded = _send(sender, receiver, "kv", x)
        errors.append(_rel(decoded, x))
        if spec.dtype in LEVELS:  # the error is one step's quantisation error of the delta sent
            scales = _per_channel_scales(x - before, LEVELS[spec.dtype])
            assert torch.all((decoded - x).abs() <= scales * (0.5 + 1e-4) + 1e-6)
    assert max(errors[10:]) <= 1.3 * max(errors[:5])  # does not grow with k
    reference = _without_feedback(spec, sequence[1:], sequence[0])
    assert reference[-1] > 2.5 * reference[0]  # without feedback it random-walks (~sqrt(k))
    assert errors[-1] < reference[-1] / 3


def test_error_feedback_corrects_the_coarse_first_use():
    spec = CodecSpec.parse("int8+residual")
    sender, receiver = ExchangeCodec(spec, 0, 2), ExchangeCodec(spec, 1, 2)
    sequence = list(_drifting(TOKENS, 20))
    errors = [_rel(_send(sender, receiver, "kv", x), x) for x in sequence]  # first use: whole value
    no_feedback = _without_feedback(spec, sequence, torch.zeros(TOKENS))
    assert errors[0] == pytest.approx(no_feedback[0])  # same first message
    assert max(errors[2:]) < no_feedback[-1] / 30  # the first step's error is re-sent and fixed
    still = sequence[-1]
    for _ in range(3):  # a buffer that stops changing converges ~254x a step
        _send(sender, receiver, "kv", still)
    assert _rel(receiver.reconstruction("kv", 0), still) < 1e-6


@pytest.mark.parametrize("text", ["int8+residual", "int4+residual", "bfloat16+residual", "float16+residual"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sender_reference_and_receiver_reconstruction_agree_exactly(text, dtype):
    sender, receiver = _pair(text)
    for shape in (TOKENS, HALO):
        key = f"k{len(shape)}"
        for x in _drifting(shape, 20, dtype=dtype, drift=0.05):
            decoded = _send(sender, receiver, key, x)
            assert decoded.dtype == dtype
            if not sender.spec.compresses(shape, dtype):  # e.g. bfloat16 on a float16 source: exact
                assert torch.equal(decoded, x) and sender.reference(key) is None
                continue
            assert decoded is receiver.reconstruction(key, 0)
            assert torch.equal(decoded, sender.reference(key))


def test_bfloat16_state_does_not_drift():
    """State lives in the buffer's dtype: bfloat16 rounding of the reference is fed back too."""
    sender, receiver = _pair("int8+residual")
    errors = [_rel(_send(sender, receiver, "kv", x), x.float()) for x in _drifting(TOKENS, 20, torch.bfloat16)]
    assert max(errors[10:]) <= 1.3 * max(errors[2:6])
    assert errors[-1] < 1e-3  # far below bfloat16's cast error (~1.7e-3) and int8's one-shot (~9e-3)


def test_decode_of_the_own_rank_is_what_the_others_hold():
    sender, receiver = _pair("int8+residual")
    x = torch.randn(TOKENS)
    with pytest.raises(ValueError, match="before it was ever encoded"):
        sender.decode("kv", 0, torch.zeros(10, dtype=torch.uint8), x.shape, x.dtype)
    wire = sender.encode("kv", x)
    mine = sender.decode("kv", 0, wire, x.shape, x.dtype)  # does not apply the wire a second time
    assert torch.equal(mine, receiver.decode("kv", 0, wire, x.shape, x.dtype))
    plain_sender, plain_receiver = _pair("int8")
    wire = plain_sender.encode("kv", x)
    assert torch.equal(plain_sender.decode("kv", 0, wire, x.shape, x.dtype),
                       plain_receiver.decode("kv", 0, wire, x.shape, x.dtype))


def test_observe_exact_resynchronises_after_a_perturbation():
    sender, receiver = _pair("int8+residual")
    sequence = list(_drifting(TOKENS, 6, drift=0.1))
    _send(sender, receiver, "kv", sequence[0])
    sender.encode("kv", sequence[1])  # a wire the receiver never applies: the two now disagree
    _send(sender, receiver, "kv", sequence[2])
    assert not torch.equal(receiver.reconstruction("kv", 0), sender.reference("kv"))
    exact = [sequence[3], sequence[3] + 1]
    sender.observe_exact("kv", exact)
    receiver.observe_exact("kv", exact)
    assert torch.equal(sender.reference("kv"), sequence[3])
    assert torch.equal(receiver.reconstruction("kv", 0), sequence[3])
    assert torch.equal(receiver.reference("kv"), sequence[3] + 1)  # the receiver's own slot
    assert receiver.reference("kv") is not exact[1]  # a copy: gathered buffers get reused
    for x in sequence[4:]:
        decoded = _send(sender, receiver, "kv", x)
        assert torch.equal(decoded, sender.reference("kv"))
        assert _rel(decoded, x) < 1e-3


def test_reset_forgets_every_reference():
    sender, receiver = _pair("int8+residual")
    x = torch.randn(TOKENS)
    first = sender.encode("kv", x).clone()
    receiver.decode("kv", 0, first, x.shape, x.dtype)
    assert not torch.equal(sender.encode("kv", x), first)  # a residual now
    sender.reset()
    receiver.reset()
    assert sender.reference("kv") is None and receiver.reconstruction("kv", 0) is None
    assert torch.equal(sender.encode("kv", x), first)  # against a zero reference again
    assert torch.equal(receiver.decode("kv", 0, first, x.shape, x.dtype), sender.reference("kv"))


def test_a_buffer_that_changes_shape_restarts_from_zero_on_both_sides():
    sender, receiver = _pair("int4+residual")
    for x in _drifting(TOKENS, 3):
        _send(sender, receiver, "kv", x)
    wider = torch.randn(2, 300, 64)
    decoded = _send(sender, receiver, "kv", wider)
    assert torch.equal(decoded, unpack(pack(wider, sender.spec), wider.shape, wider.dtype, sender.spec))
    assert torch.equal(decoded, sender.reference("kv"))


def test_ranks_and_keys_are_kept_apart():
    spec = CodecSpec.parse("int8+residual")
    senders = [ExchangeCodec(spec, r, 3) for r in range(3)]
    receiver = senders[2]
    for step in range(4):
        for rank in (0, 1):
            for key in ("a", "b"):
                x = torch.randn(TOKENS) + 10 * rank + 100 * (key == "b") + step
                wire = senders[rank].encode(key, x)
                receiver.decode(key, rank, wire, x.shape, x.dtype)
    for rank in (0, 1):
        for key in ("a", "b"):
            assert torch.equal(receiver.reconstruction(key, rank), senders[rank].reference(key))
    with pytest.raises(ValueError, match="outside a group"):
        ExchangeCodec(spec, 3, 3)
    with pytest.raises(ValueError, match="for a group of 3"):
        receiver.observe_exact("a", [torch.zeros(TOKENS)] * 2)


def test_dequantize_inverts_quantize_on_the_grid():
    levels = 7
    q = torch.randint(-levels, levels + 1, TOKENS, dtype=torch.int8)
    q[0, 0, :] = levels  # every channel reaches the top level: scale = channel scale exactly
    scales = torch.rand(TOKENS[2]) + 0.5
    x = dequantize(q, scales)
    again, rescales = quantize(x, levels)
    assert torch.equal(again, q) and torch.allclose(rescales, scales)
