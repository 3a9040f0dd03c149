"""kernels/fused_adam.cu and kernels/sign_pack.cu, run by the CPU emulation, against torch.

    .venv/bin/python -m pytest -q tests/test_kernels_adam_sign.py

Fused Adam: five steps over tensors of 1, 7, 33, 1000 and 4099 elements in one launch per step
(chunks of 1024, so 4099 spans five blocks; the 1000-element param is a view at an odd offset, so
the scalar path runs too), fp32 and bf16-with-master, against torch.optim.AdamW / Adam (L2).
The kernel rounds where torch's CPU kernels round (fused multiply-adds included), so exp_avg and
exp_avg_sq agree to the bit on x86 (asserted to rtol 1e-6, atol 1e-9: other CPUs may round
differently). The params differ by a few ulps of the update: torch's CPU sqrt is not correctly
rounded (1 ulp off for ~19% of inputs here), the kernel's sqrtf is, as CUDA's is. Params are
asserted to rtol 1e-6, atol 1e-8 (lr 1e-2: 1e-6 of a step); measured: at most 1.2e-7 (1 ulp
of a param near 1), and exp_avg / exp_avg_sq exactly equal but with L2 decay (which feeds the
param back: 1.5e-8 and 2.3e-10, relative 1e-7).

Sign pack: the bits are compressed.pack_signs's, sign(0) = sign(-0) = +1, and given the scale the
worker error is compressed.py's arithmetic bit for bit; the kernels' scale (an fp64 sum of squares,
rounded once) is within half an ulp of the exact root mean square, and measured within 3 ulps of
torch's fp32 norm (asserted: 4), so the error differs from torch's by that much, no more.
Every output is NaN-poisoned first (`poison_outputs`).
"""
import math

import pytest
import torch

from ds_lab.comm import compressed
from ds_lab.ops import emulate, poison_outputs
from ds_lab.ops.fused_adam import adam_reference, chunk_table, fused_adam_step
from ds_lab.ops.sign_pack import pack_with_error, unpack_scaled, unpack_scaled_reference
from ds_lab.optim.adam import Adam

pytestmark = pytest.mark.skipif(not emulate.available(), reason="the CPU emulation needs a C++20 compiler")

SIZES = (1, 7, 33, 1000, 4099)
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
STATE_TOLERANCE = dict(rtol=1e-6, atol=1e-9)
PARAM_TOLERANCE = dict(rtol=1e-6, atol=1e-8)


def _params(seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=generator) for n in SIZES]
    odd = torch.empty(SIZES[3] + 1)[1:]  # 4 bytes past an aligned start: no float4 loads for this one
    params[3] = odd.copy_(params[3])
    return params


def _grads(step: int) -> list:
    generator = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(n, generator=generator) for n in SIZES]
    grads[0].zero_()  # a zero gradient: the moments decay, the param still moves by its decay
    return grads


def _run_fused_against_torch(adam_w_mode: bool, bf16: bool, steps: int = 5):
    start = _params(seed=7)
    reference = [p.clone().requires_grad_() for p in start]
    optimizer = (torch.optim.AdamW if adam_w_mode else torch.optim.Adam)(reference, foreach=False, **HYPER)
    masters = [p.clone() for p in start] if bf16 else None
    params = [p.to(torch.bfloat16) for p in start] if bf16 else start
    exp_avgs, exp_avg_sqs = [torch.zeros(n) for n in SIZES], [torch.zeros(n) for n in SIZES]
    for step in range(1, steps + 1):
        grads = _grads(step)
        if bf16:
            grads = [g.to(torch.bfloat16) for g in grads]  # torch's optimizer sees the same values, in fp32
        for p, g in zip(reference, grads):
            p.grad = g.float()
        optimizer.step()
        with poison_outputs():
            fused_adam_step(params, grads, exp_avgs, exp_avg_sqs, step=step, adam_w_mode=adam_w_mode,
                            masters=masters, backend="emulate", chunk_size=1024, **HYPER)
    state = [optimizer.state[p] for p in reference]
    return (params, masters, exp_avgs, exp_avg_sqs, [p.detach() for p in reference],
            [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state])


def _max_error(ours, theirs) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, theirs))


@pytest.mark.parametrize("adam_w_mode", [True, False], ids=["adamw", "adam_l2"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_master"])
def test_fused_adam_matches_torch_optim_over_five_steps_in_one_launch_per_step(adam_w_mode, bf16):
    params, masters, exp_avgs, exp_avg_sqs, ref_params, ref_exp_avgs, ref_exp_avg_sqs = \
        _run_fused_against_torch(adam_w_mode, bf16)
    updated = masters if bf16 else params
    compared = [(updated, ref_params, PARAM_TOLERANCE), (exp_avgs, ref_exp_avgs, STATE_TOLERANCE),
                (exp_avg_sqs, ref_exp_avg_sqs, STATE_TOLERANCE)]
    for ours, theirs, tolerance in compared:
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **tolerance)
    if bf16:  # the bf16 param is its master rounded to nearest even, exactly as torch rounds
        for param, master in zip(params, masters):
            assert torch.equal(param, master.to(torch.bfloat16))
    print(f"max |error| params {_max_error(updated, ref_params):.3g} exp_avg {_max_error(exp_avgs, ref_exp_avgs):.3g} "
          f"exp_avg_sq {_max_error(exp_avg_sqs, ref_exp_avg_sqs):.3g}")


@pytest.mark.parametrize("bias_correction", [True, False])
def test_torch_reference_is_ds_lab_adam_and_the_kernel_agrees_with_it(bias_correction):
    hyper = dict(HYPER, weight_decay=0.05)
    start = _params(seed=3)
    ds_params = [p.clone().requires_grad_() for p in start]
    optimizer = Adam(ds_params, bias_correction=bias_correction, **hyper)
    ref_params, fused_params = [p.clone() for p in start], [p.clone() for p in start]
    ref_state = [[torch.zeros(n) for n in SIZES] for _ in range(2)]
    fused_state = [[torch.zeros(n) for n in SIZES] for _ in range(2)]
    for step in (1, 2, 3):
        grads = _grads(step)
        for p, g in zip(ds_params, grads):
            p.grad = g.clone()
        optimizer.step()
        adam_reference(ref_params, grads, *ref_state, step=step, bias_correction=bias_correction, **hyper)
        with poison_outputs():
            fused_adam_step(fused_params, grads, *fused_state, step=step, bias_correction=bias_correction,
                            backend="emulate", chunk_size=1024, **hyper)
    for a, b in zip(ref_params, ds_params):
        assert torch.equal(a, b.detach())  # the same ops in the same order
    for a, b in zip(fused_params, ref_params):
        torch.testing.assert_close(a, b, **PARAM_TOLERANCE)
    for a, b in zip(fused_state, ref_state):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **STATE_TOLERANCE)


def test_fused_adam_rejects_mismatched_inputs_with_a_clear_message():
    p, g = torch.zeros(4), torch.zeros(4)
    with pytest.raises(ValueError, match="masters="):
        fused_adam_step([p.bfloat16()], [g.bfloat16()], [p], [p], step=1, backend="emulate", **HYPER)
    with pytest.raises(ValueError, match="one of each"):
        fused_adam_step([p], [g], [p], [], step=1, backend="emulate", **HYPER)
    with pytest.raises(ValueError, match="multiple of 4"):
        fused_adam_step([p], [g], [torch.zeros(4)], [torch.zeros(4)], step=1, backend="emulate", chunk_size=6, **HYPER)


def test_chunk_table_tiles_every_tensor_and_skips_empty_ones():
    table = chunk_table([1, 0, 7, 2049, 4], chunk_size=1024).tolist()
    assert table == [[0, 0, 1], [2, 0, 7], [3, 0, 1024], [3, 1024, 1024], [3, 2048, 1], [4, 0, 4]]


def _buffer(n: int = 8 * 515, seed: int = 0) -> torch.Tensor:
    buffer = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    buffer[:3] = 0.0
    buffer[3:6] = -0.0  # sign(-0) = +1 too: -0.0 >= 0
    buffer[6:9] = torch.tensor([1e-30, -1e-30, 1e-45])
    return buffer


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd_offset"])
def test_sign_pack_bits_are_pack_signs_and_unpack_round_trips_to_signs(offset):
    n = 8 * 515
    buffer = torch.empty(n + offset)[offset:].copy_(_buffer(n))  # offset 1: the scalar paths
    with poison_outputs():
        packed, _ = pack_with_error(buffer, torch.zeros(n), backend="emulate")
        signs = unpack_scaled(packed, torch.ones(1), backend="emulate")
    assert torch.equal(packed, compressed.pack_signs(buffer))
    assert torch.equal(signs, compressed.signs(buffer))
    assert (signs[:6] == 1.0).all()


def _fp32_ulp(x: float) -> float:
    return 2.0 ** (math.frexp(x)[1] - 24)


def test_worker_error_feedback_is_compressed_arithmetic_bit_for_bit_over_rounds():
    n = 8 * 515
    x = torch.randn(n, generator=torch.Generator().manual_seed(5))
    error = torch.zeros(n)
    for _ in range(3):  # error feedback: each round compresses x plus what the last rounds lost
        buffer = x + error
        with poison_outputs():
            packed, scale = pack_with_error(buffer, error, backend="emulate")
        assert torch.equal(error, buffer - scale * compressed.signs(buffer))  # given the scale: exact
        assert torch.equal(packed, compressed.pack_signs(buffer))
        torch_scale = compressed.scale_of(buffer)
        exact = buffer.double().norm().item() / math.sqrt(n)
        ulp = _fp32_ulp(torch_scale.item())
        assert abs(scale.item() - exact) <= 0.51 * ulp  # fp64 sum of squares, rounded once
        assert abs(scale.item() - torch_scale.item()) <= 4 * ulp  # torch's fp32 norm is a few ulps off
        reference = buffer - torch_scale * compressed.signs(buffer)  # compressed.py's worker step as is
        rounding = _fp32_ulp(reference.abs().max().item())
        torch.testing.assert_close(error, reference, rtol=0, atol=abs(scale.item() - torch_scale.item()) + rounding)
    with poison_outputs():
        _, again = pack_with_error(buffer, error.clone(), backend="emulate")
    assert torch.equal(again, scale)  # a fixed summation order: the same bits every call


def test_unpack_scaled_is_compressed_arithmetic_for_per_chunk_scales():
    packed = compressed.pack_signs(_buffer(8 * 4 * 130, seed=2))
    scales = torch.tensor([0.5, 1.25, 3.0e-3, 7.0])  # one per chunk of 130 bytes, as one scale per server
    with poison_outputs():
        values = unpack_scaled(packed, scales, backend="emulate")
    assert torch.equal(values, unpack_scaled_reference(packed, scales))
    assert torch.equal(values.abs().reshape(4, -1), scales.reshape(4, 1).expand(4, 8 * 130))


def test_sign_pack_rejects_lengths_that_are_not_whole_bytes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_with_error(torch.zeros(12), torch.zeros(12), backend="emulate")
    with pytest.raises(ValueError, match="equal chunks"):
        unpack_scaled(torch.zeros(5, dtype=torch.uint8), torch.ones(2), backend="emulate")
