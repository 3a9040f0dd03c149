"""The fused kernels (kernels/layer_norm.cu, bias_gelu.cu, causal_softmax.cu) match their torch
references, forward and backward, run by the CPU emulation of CUDA: odd shapes (rows and columns
that are not multiples of 4, 32 or the block size), fp32 and bf16, both GeLU forms, and every
output poisoned with NaN first, so an element a kernel forgets to write fails the comparison.

The reference runs in float64 on the same values (for bf16: the same bf16 values), so it is the
exact answer: fp32 kernels are held to fp32 rounding, bf16 ones (fp32 math, one rounding per
output) to a few bf16 ulps. (In fp32, torch's own LayerNorm of a single column gives xhat ~ 1e-8
instead of 0, times rstd = 1/sqrt(eps); the kernel gives 0.)
"""
import pytest
import torch

import ds_lab.ops
from ds_lab.ops import emulate
from ds_lab.ops.backend import BackendError, poison_outputs
from ds_lab.ops.gelu import bias_gelu, bias_gelu_reference
from ds_lab.ops.norm import layer_norm, layer_norm_reference
from ds_lab.ops.softmax import causal_mask, causal_softmax, causal_softmax_reference

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no C++ compiler for the emulation")

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# [..., cols]: 1, 3 and 37 rows; 1, 7, 33, 129 and 1000 columns; leading dimensions flattened
SHAPES = [(1, 1), (3, 7), (37, 33), (3, 1, 129), (37, 1000), (1, 3, 1000)]
SCORES = [(1, 1, 1), (2, 3, 7, 7), (1, 33, 33), (3, 37, 37), (1, 129, 129)]


def forward_backward(op, inputs, grad_out=None, poisoned=True):
    """op(*inputs) and the gradients of every input, for fresh leaves (`grad_out` None: drawn)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with poison_outputs() if poisoned else _nothing():
        out = op(*leaves)
        grad_out = torch.randn(out.shape, generator=_seeded(99)).to(out.dtype) if grad_out is None else grad_out
        out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves], grad_out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def random(shape, dtype, seed, scale=1.0):
    return (torch.randn(shape, generator=_seeded(seed)) * scale).to(dtype)


def assert_parity(kernel_op, reference_op, inputs, dtype):
    """The kernel's output and input gradients equal the reference's (float64, the same values)."""
    out, grads, grad_out = forward_backward(kernel_op, inputs)
    expected, expected_grads, _ = forward_backward(reference_op, [t.double() for t in inputs], grad_out.double(),
                                                   poisoned=False)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    for name, got, want in zip("abcdefgh", grads, expected_grads):
        torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype], msg=lambda m: f"grad of input {name}: {m}")


# --- LayerNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_torch_forward_and_backward(shape, dtype):
    cols = shape[-1]
    x = random(shape, dtype, 0, scale=3.0) + 1.5  # an offset mean: the variance must not cancel
    weight, bias = random(cols, dtype, 1) + 1.0, random(cols, dtype, 2)
    assert_parity(lambda *t: layer_norm(*t, backend="emulate"), layer_norm_reference, [x, weight, bias], dtype)


def test_layer_norm_weight_gradient_is_reproducible_bit_for_bit():
    x, weight, bias = random((37, 129), torch.float32, 3), random(129, torch.float32, 4), random(129, torch.float32, 5)
    grad_out = random((37, 129), torch.float32, 6)
    runs = [forward_backward(lambda *t: layer_norm(*t, backend="emulate"), [x, weight, bias], grad_out)[1]
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_layer_norm_without_weight_and_bias_is_plain_normalisation():
    x = random((3, 33), torch.float32, 7)
    with poison_outputs():
        y = layer_norm(x, None, None, backend="emulate")
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (33,)), **TOLERANCE[torch.float32])


# --- bias + GeLU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_torch_forward_and_backward(shape, dtype, approximate, monkeypatch):
    monkeypatch.setattr(ds_lab.ops, "GELU_APPROXIMATE", approximate)
    x, bias = random(shape, dtype, 10, scale=2.0), random(shape[-1], dtype, 11)
    assert_parity(lambda *t: bias_gelu(*t, backend="emulate"),
                  lambda *t: bias_gelu_reference(*t, approximate=approximate), [x, bias], dtype)


@pytest.mark.parametrize("cols", [8, 7])
def test_bias_gelu_takes_the_scalar_path_for_unaligned_tensors(cols):
    """x starting one element into its storage cannot be read as float4: the scalar loops run."""
    x = random(5 * cols + 1, torch.float32, 12)[1:].view(5, cols)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    bias = random(cols, torch.float32, 13)
    assert_parity(lambda *t: bias_gelu(*t, backend="emulate"), bias_gelu_reference, [x, bias], torch.float32)


def test_bias_gelu_reads_the_approximation_at_every_call(monkeypatch):
    x, bias = random((3, 33), torch.float32, 14, scale=2.0), random(33, torch.float32, 15)
    results = {}
    for form in ["tanh", "none"]:
        monkeypatch.setattr(ds_lab.ops, "GELU_APPROXIMATE", form)
        with poison_outputs():
            results[form] = bias_gelu(x, bias, backend="emulate")
        torch.testing.assert_close(results[form], bias_gelu_reference(x, bias, form), **TOLERANCE[torch.float32])
    assert not torch.equal(results["tanh"], results["none"])
    with pytest.raises(ValueError, match="GELU_APPROXIMATE"):  # refused when set, before any call
        ds_lab.ops.GELU_APPROXIMATE = "sigmoid"
    assert ds_lab.ops.GELU_APPROXIMATE == "none"


# --- causal softmax -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SCORES, ids=str)
def test_causal_softmax_matches_torch_forward_and_backward(shape, dtype):
    scores = random(shape, dtype, 20, scale=4.0)
    assert_parity(lambda s: causal_softmax(s, backend="emulate"), causal_softmax_reference, [scores], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_softmax_is_exactly_zero_above_the_diagonal(dtype):
    scores = random((2, 37, 37), dtype, 21, scale=30.0)  # large scores: a leak would not be tiny
    probs, (dscores,), _ = forward_backward(lambda s: causal_softmax(s, backend="emulate"), [scores])
    above = causal_mask(37).expand_as(probs)
    assert torch.all(probs[above] == 0) and torch.all(dscores[above] == 0)
    assert torch.all(probs[~above] >= 0)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(2, 37), **TOLERANCE[dtype])


def test_causal_softmax_wants_square_scores():
    with pytest.raises(ValueError, match=r"\[T, T\]"):
        causal_softmax(torch.zeros(2, 3, 4), backend="emulate")


# --- dispatch ------------------------------------------------------------------------------------------

def _ones(t):
    return torch.ones(t.shape[-1], dtype=t.dtype)


CALLS = {
    "layer_norm": lambda t, backend: layer_norm(t, _ones(t), _ones(t) / 2, backend=backend),
    "bias_gelu": lambda t, backend: bias_gelu(t, _ones(t) / 2, backend=backend),
    "causal_softmax": lambda t, backend: causal_softmax(t, backend=backend),
}
REFERENCES = {
    "layer_norm": lambda t: layer_norm_reference(t, _ones(t), _ones(t) / 2),
    "bias_gelu": lambda t: bias_gelu_reference(t, _ones(t) / 2, ds_lab.ops.GELU_APPROXIMATE),
    "causal_softmax": causal_softmax_reference,
}


@pytest.mark.parametrize("op", sorted(CALLS))
def test_backend_cuda_without_a_gpu_is_an_error_and_none_runs_torch(op):
    t = random((2, 5, 5), torch.float32, 30)
    with pytest.raises(BackendError, match="cuda"):
        CALLS[op](t, "cuda")
    assert torch.equal(CALLS[op](t, None), REFERENCES[op](t))
    assert torch.equal(CALLS[op](t, "torch"), REFERENCES[op](t))


@pytest.mark.parametrize("op", sorted(CALLS))
def test_a_dtype_the_kernels_lack_is_an_error_when_asked_for_and_torch_by_default(op):
    t = random((2, 5, 5), torch.float32, 31).double()
    with pytest.raises(BackendError, match="float32 or bfloat16"):
        CALLS[op](t, "emulate")
    assert CALLS[op](t, None).dtype == torch.float64


def test_the_gpt_runs_the_fused_kernels_where_they_can_run(monkeypatch):
    """Make the default backend the emulation (as if a GPU were here): the GPT's LayerNorms and MLP
    then go through kernels/layer_norm.cu and kernels/bias_gelu.cu; loss and gradients equal torch's."""
    from ds_lab.models import GPT, GPTConfig
    from ds_lab.ops import backend as backends
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=34, block_size=8, vocab_size=37))
    x = torch.randint(0, 37, (2, 8))
    plain = model(input_ids=x, labels=x).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    original = backends.resolve

    def as_if_on_a_gpu(backend, *tensors):
        calls.append(backend)
        return "emulate" if backend is None else original(backend, *tensors)
    monkeypatch.setattr(backends, "resolve", as_if_on_a_gpu)
    with poison_outputs():
        fused = model(input_ids=x, labels=x).loss
        fused.backward()
    assert len(calls) >= 3  # ln_1, ln_2, ln_f, and the MLP
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
