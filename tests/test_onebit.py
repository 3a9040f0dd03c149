"""1-bit Adam, its compressed all-reduce, and the two sign optimizers, held to single-process
simulations of N workers (tests/onebit_reference.py) on launched ranks at world 2, 3 and 4."""
import json
import math
import pathlib

import numpy as np
import pytest
import torch

import ds_lab
from ds_lab.comm import compressed
from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.models import GPT, GPTConfig
from ds_lab.optim import Adam, OneBitAdam, SignAdam
from tests import onebit_reference as ref
from tests import onebit_workers as w
from tests.workers import make_batches

SIZES = [1, 7, 1001, 4099]  # none a multiple of N * lcm(N, 8) for N = 2, 3, 4


def onebit(freeze_step=3, lr=1e-4, weight_decay=0.01, clip=0.0, **extra):
    return {"train_batch_size": 12, "gradient_clipping": clip, **extra,
            "optimizer": {"type": "OneBitAdam", "params": {"lr": lr, "freeze_step": freeze_step,
                                                           "weight_decay": weight_decay}}}


def exactly(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=msg)  # fp32 rounding; in practice 0


# ---- bits, padding, bytes: one process ----------------------------------------------------------

def test_signs_pack_eight_per_byte_msb_first_with_sign_of_zero_plus_one():
    x = torch.tensor([1.0, -2.0, 0.0, -0.0, -1e-30, 3.0, -1.0, 5.0, -7.0] + [0.5] * 7)
    packed = compressed.pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == 2
    assert packed.tolist() == np.packbits((x >= 0).numpy()).tolist()
    assert compressed.unpack_signs(packed).tolist() == [1, -1, 1, 1, -1, 1, -1, 1, -1] + [1] * 7


@pytest.mark.parametrize("world", range(1, 9))
def test_padding_is_a_multiple_of_n_times_lcm_n_8(world):
    unit = world * world * 8 // math.gcd(world, 8)
    for n in (1, 7, 1001, 4099, unit, unit + 1):
        p = compressed.padded_length(n, world)
        assert p % unit == 0 and n <= p < n + unit and (p // world) % 8 == 0


def test_wire_bytes_are_a_32nd_of_the_fp32_all_reduce_plus_padding_and_scales():
    n, world = 1_000_000, 4
    fp32 = 2 * (world - 1) / world * 4 * n
    ratio = compressed.wire_bytes(n, world) / fp32
    assert ratio == pytest.approx(compressed.padded_length(n, world) / (32 * n) + world / n)
    assert 1 / 32 < ratio < 1 / 32 * 1.001


# ---- the collectives on ranks ----------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4])
def test_compressed_allreduce_equals_the_simulation_round_after_round(world):
    rounds = 3
    out = ds_lab.launch(w.compressed_worker, world, SIZES, rounds)
    sims = {n: ref.SimulatedCompressor(n, world) for n in SIZES}
    for r in range(rounds):
        for n in SIZES:
            expected = sims[n]([w.rank_tensor(n, k, r) for k in range(world)])
            for rank in range(world):  # the same result on every rank: the error feedback carries over
                exactly(out[rank]["results"][r][n], expected, f"round {r} size {n} rank {rank}")
    p = {n: compressed.padded_length(n, world) for n in SIZES}
    expected_log = [[("all_to_all", p[n] // 8, world, "compressed_allreduce"),
                     ("all_gather", 4 * world, world, "compressed_allreduce"),
                     ("all_gather", p[n] // 8, world, "compressed_allreduce"),
                     ("all_gather", 4 * world, world, "compressed_allreduce")] for _ in range(rounds) for n in SIZES]
    assert out[0]["logs"] == expected_log


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sign_majority_vote_equals_the_simulation(world):
    out = ds_lab.launch(w.compressed_worker, world, SIZES, 2, True)
    for r in range(2):
        for n in SIZES:
            expected = ref.majority_vote([w.rank_tensor(n, k, r) for k in range(world)])
            for rank in range(world):
                assert torch.equal(out[rank]["results"][r][n], expected)
    p = compressed.padded_length(SIZES[-1], world)
    assert out[0]["logs"][-1] == [("all_to_all", p // 8, world, "sign_vote"), ("all_gather", p // 8, world, "sign_vote")]


# ---- 1-bit Adam on the engine ----------------------------------------------------------------------

def simulate(results, steps=None, **kwargs):
    names = results[0]["names"]
    steps = len(results[0]["grads"]) if steps is None else steps
    params = ref.simulate_onebit_adam([results[0]["start"][n] for n in names], [r["grads"][:steps] for r in results],
                                      results[0]["compressing"][:steps], **kwargs)
    return dict(zip(names, params))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_onebit_adam_equals_the_simulation_of_n_workers(world):
    batches = make_batches(6, 12, 16)
    res = ds_lab.launch(w.train_worker, world, onebit(), batches)
    # steps 1 .. F-1 = 1, 2 are warmup; compression from step F = 3 on
    assert res[0]["compressing"] == [False, False, True, True, True, True]
    for r in res[1:]:  # warmup gradients are averaged (equal); after the switch they are each rank's own
        assert all(torch.equal(a, b) for a, b in zip(r["grads"][1], res[0]["grads"][1]))
        assert not all(torch.equal(a, b) for a, b in zip(r["grads"][3], res[0]["grads"][3]))
        assert all(torch.equal(r["weights"][k], res[0]["weights"][k]) for k in res[0]["weights"])
    expected = simulate(res, lr=1e-4, weight_decay=0.01)
    for name, value in expected.items():
        exactly(res[0]["weights"][name], value, name)


def test_onebit_adam_in_bf16_steps_fp32_masters_equal_to_the_simulation():
    batches = make_batches(6, 12, 16)
    res = ds_lab.launch(w.train_worker, 2, onebit(lr=1e-3, bf16={"enabled": True}), batches)
    assert res[0]["compressing"] == [False, False, True, True, True, True]
    torch.manual_seed(0)
    start = dict(GPT(GPTConfig(**w.TINY)).named_parameters())  # masters begin at the bf16-rounded values
    names = res[0]["names"]
    final = ref.simulate_onebit_adam([start[n].detach().to(torch.bfloat16).float() for n in names],
                                     [r["grads"] for r in res],
                                     res[0]["compressing"], lr=1e-3, weight_decay=0.01)
    for name, value in zip(names, final):  # the module holds the masters rounded to bf16
        assert torch.equal(res[0]["weights"][name], value.to(torch.bfloat16).float()), name
        assert torch.equal(res[1]["weights"][name], res[0]["weights"][name]), name


def test_onebit_adam_in_fp16_with_loss_scaling_trains_on_equal_ranks():
    batches = make_batches(6, 12, 16)
    res = ds_lab.launch(w.train_worker, 2, onebit(lr=1e-3, fp16={"enabled": True, "initial_scale_power": 8}),
                        batches, 0, False)
    assert res[0]["compressing"] == [False, False, True, True, True, True]
    assert all(math.isfinite(x) for x in res[0]["losses"]) and res[0]["losses"][-1] < res[0]["losses"][0]
    for k, v in res[0]["weights"].items():
        assert torch.equal(res[1]["weights"][k], v), k


def test_clipping_after_the_switch_uses_each_ranks_local_norm_as_deepspeed_does():
    batches = make_batches(5, 12, 16)
    res = ds_lab.launch(w.train_worker, 3, onebit(lr=1e-3, clip=0.05), batches)
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in r["grads"][4]])).item() for r in res]
    assert min(norms) > 0.05  # every rank's gradient is really clipped, each by its own norm
    expected = simulate(res, lr=1e-3, weight_decay=0.01, clip=0.05)
    for name, value in expected.items():
        exactly(res[0]["weights"][name], value, name)


@pytest.mark.parametrize("world", [2, 4])
def test_after_warmup_a_step_sends_a_32nd_plus_padding_and_scales_and_no_gradient_all_reduce(world):
    batches = make_batches(4, 12, 16)
    res = ds_lab.launch(w.train_worker, world, onebit(), batches, 0, False)[0]
    sizes = [p.numel() for p in GPT(GPTConfig(**w.TINY)).parameters()]
    psi = sum(sizes)
    warm, compressed_step = res["traffic"][0], res["traffic"][3]
    assert {t[3] for t in warm} == {"grad_allreduce"} and sum(t[1] for t in warm) == 4 * psi
    assert {t[3] for t in compressed_step} == {"compressed_allreduce"}
    pad = [compressed.padded_length(n, world) for n in sizes]
    assert sum(t[1] for t in compressed_step) == sum(2 * p // 8 + 2 * 4 * world for p in pad)
    wire = sum(t[4] for t in compressed_step)
    assert wire == pytest.approx(sum(compressed.wire_bytes(n, world) for n in sizes))
    fp32_wire = sum(t[4] for t in warm)
    assert wire / fp32_wire == pytest.approx(sum(pad) / (32 * psi) + world * len(sizes) / psi)


def test_with_freeze_step_beyond_the_run_it_is_adam_without_bias_correction():
    batches = make_batches(4, 12, 16)
    one = ds_lab.launch(w.train_worker, 1, onebit(freeze_step=100, lr=1e-3), batches, 0, False)[0]
    adam = ds_lab.launch(w.train_worker, 1, onebit(freeze_step=100, lr=1e-3), batches, 0, False, None, None,
                         lambda params: Adam(params, lr=1e-3, weight_decay=0.01, bias_correction=False))[0]
    two = ds_lab.launch(w.train_worker, 2, onebit(freeze_step=100, lr=1e-3), batches, 0, False)[0]
    assert not any(one["compressing"])
    for k in one["weights"]:
        torch.testing.assert_close(one["weights"][k], adam["weights"][k], rtol=0, atol=2e-6, msg=k)
        torch.testing.assert_close(two["weights"][k], adam["weights"][k], rtol=0, atol=1e-5, msg=k)


def test_a_checkpoint_after_the_switch_resumes_as_a_run_whose_errors_restart_at_zero(tmp_path):
    batches = make_batches(7, 12, 16)
    through = ds_lab.launch(w.train_worker, 2, onebit(), batches, 0, False, None, ("save", str(tmp_path), 4))
    reset = ds_lab.launch(w.train_worker, 2, onebit(), batches, 0, False, 4)
    resumed = ds_lab.launch(w.train_worker, 2, onebit(), batches[4:], 7, False, None, ("load", str(tmp_path)))
    assert resumed[0]["compressing"] == [True] * 3  # the step count came back: still compressing
    assert resumed[0]["losses"] == reset[0]["losses"][4:]
    for k, v in reset[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][k], v), k
    # the errors mattered: the uninterrupted run (errors kept) differs
    assert any(not torch.equal(through[0]["weights"][k], v) for k, v in reset[0]["weights"].items())


def test_error_buffers_are_optimizer_state_in_the_ledger():
    batches = make_batches(4, 12, 16)
    res = ds_lab.launch(w.train_worker, 2, onebit(), batches, 0, False)[0]
    sizes = [p.numel() for p in GPT(GPTConfig(**w.TINY)).parameters()]
    errors = sum(4 * (p + p // 2) for p in (compressed.padded_length(n, 2) for n in sizes))
    assert res["memory"]["optimizer_states"] == 8 * sum(sizes) + errors


# ---- sign optimizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("world,momentum", [(2, 0.0), (3, 0.9), (4, 0.9)])
def test_sign_sgd_with_majority_vote_equals_the_simulation(world, momentum):
    config = {"train_batch_size": 12, "gradient_clipping": 0.0,
              "optimizer": {"type": "SignSGD", "params": {"lr": 1e-4, "momentum": momentum, "weight_decay": 0.01}}}
    batches = make_batches(4, 12, 16)
    res = ds_lab.launch(w.train_worker, world, config, batches)
    names = res[0]["names"]
    expected = ref.simulate_sign_sgd([res[0]["start"][n] for n in names], [r["grads"] for r in res], 1e-4,
                                     momentum, 0.01)
    for name, value in zip(names, expected):
        exactly(res[0]["weights"][name], value, name)
    assert {t[3] for step in res[0]["traffic"] for t in step} == {"sign_vote"}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sign_adam_is_the_articles_rule_on_the_averaged_gradient_with_adams_traffic(world):
    config = {"train_batch_size": 12, "gradient_clipping": 0.0,
              "optimizer": {"type": "SignAdam", "params": {"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01}}}
    batches = make_batches(3, 12, 16)
    res = ds_lab.launch(w.train_worker, world, config, batches)
    psi = sum(p.numel() for p in GPT(GPTConfig(**w.TINY)).parameters())
    assert [sum(t[1] for t in step) for step in res[0]["traffic"]] == [4 * psi] * 3  # 32 bits per element
    names = res[0]["names"]
    expected = ref.simulate_sign_adam([res[0]["start"][n] for n in names], res[0]["grads"], 1e-3, eps=1e-3,
                                   weight_decay=0.01)  # eps 1e-3: with 1e-8 the key bias's lr/eps step NaNs it
    for name, value in zip(names, expected):
        exactly(res[0]["weights"][name], value, name)


def test_sign_adam_by_hand():
    """The rule on one tensor: sign(m^)/(sqrt(v^)+eps); sign(0) = 0 does not move."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = SignAdam([p], lr=0.1, betas=(0.5, 0.5), eps=1e-12)
    p.grad = torch.tensor([2.0, -4.0, 0.0])
    opt.step()
    m_hat, v_hat = torch.tensor([2.0, -4.0, 0.0]), torch.tensor([4.0, 16.0, 0.0])
    expected = torch.tensor([1.0, -2.0, 0.5]) - 0.1 * torch.sign(m_hat) / (v_hat.sqrt() + 1e-12)
    assert torch.equal(p.detach(), expected) and p.detach()[2] == 0.5  # sign(0) = 0: no move


# ---- what is refused, and how the config reads ------------------------------------------------------

def test_config_reads_deepspeeds_onebit_params_and_refuses_what_it_cannot_do():
    cfg = DeepSpeedConfig.from_any({"train_batch_size": 4, "optimizer": {"type": "onebitadam", "params": {
        "lr": 2e-4, "freeze_step": 7, "cuda_aware": False, "comm_backend_name": "nccl", "bias_correction": False}}})
    assert cfg.optimizer.type == "OneBitAdam" and cfg.optimizer.params["freeze_step"] == 7
    with pytest.raises(ConfigError, match="AMSGrad"):
        DeepSpeedConfig.from_any({"train_batch_size": 4, "optimizer": {"type": "OneBitAdam", "params": {"amsgrad": True}}})
    with pytest.raises(ConfigError, match="freez"):
        DeepSpeedConfig.from_any({"train_batch_size": 4, "optimizer": {"type": "OneBitAdam", "params": {"freeze": 3}}})
    from ds_lab.modes import mode_builder
    cfg = DeepSpeedConfig.from_any(dict(onebit(), zero_optimization={"stage": 1}))
    with pytest.raises(ConfigError, match="ZeRO stage 0 only"):
        mode_builder(cfg)

    class TensorParallelGrid:  # what the builder asks of a grid of 2 data x 2 model ranks
        def size(self, axis):
            return 2 if axis in ("data", "model") else 1
    build = mode_builder(DeepSpeedConfig.from_any(onebit()))
    with pytest.raises(ConfigError, match="pure data parallel"):
        build(torch.nn.Linear(2, 2), [], TensorParallelGrid(), torch.float32, torch.device("cpu"))


def test_exp_avg_mask_keeps_masked_momentum_at_zero_through_compression():
    p = torch.nn.Parameter(torch.ones(10))
    mask = torch.tensor([1.0] * 5 + [0.0] * 5)
    opt = OneBitAdam([{"params": [p], "exp_avg_mask": mask}], lr=0.1, freeze_step=2)
    for step in range(3):
        p.grad = torch.tensor([1.0] * 5 + [0.0] * 5)
        opt.step()
    assert opt.compressing(3) and torch.equal(opt.state[p]["exp_avg"][5:], torch.zeros(5))
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["exp_avg_mask"] is mask


# ---- DeepSpeed itself -------------------------------------------------------------------------------

DEEPSPEED = json.loads((pathlib.Path(__file__).parent / "deepspeed_onebit_adam.json").read_text())


@pytest.mark.parametrize("world", [2, 3, 4])
def test_equal_to_deepspeed_0_18_9s_onebit_adam_run_on_cpu(world):
    """tests/deepspeed_onebit_adam.json was measured from DeepSpeed 0.18.9 (the last with 1-bit Adam),
    torch 2.13.0+cpu, gloo, `torchrun --nproc-per-node N` (N = 2, 3, 4), DS_ACCELERATOR=cpu. The probe:

        torch.manual_seed(0)
        model = Sequential(Linear(5, 7), Tanh(), Linear(7, 3))      # tensors of 35, 7, 21, 3 elements
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "optimizer": {
                  "type": "OneBitAdam", "params": {"lr": 0.01, "freeze_step": 3, "weight_decay": 0.01,
                                                  "comm_backend_name": "compressed"}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        for step in range(9):                     # x, y = tests/onebit_workers.py probe_data(step, rank)
            loss = mse_loss(engine(x), y); engine.backward(loss); engine.step()
            record loss, every weight, engine.enable_backward_allreduce

    Two things had to be patched for DeepSpeed's CPU build, neither touching the numbers: its
    `CompressedBackend` loads a packbits op that has no CPU implementation (replaced by numpy's
    packbits of sign(x) + 1 > 0, the NCCL path's rule), and it all-gathers a 0-dim scale into
    1-element buffers, which gloo refuses (the scale is reshaped to (1,)).

    What it shows: DeepSpeed's fp32 path spends the user's first step() on initialising (no weight
    moves), so its step t+1 is ds_lab's step t; its gradient all-reduce is off from its step 4 = ds_lab's
    step 3 = freeze_step; and every later weight is ds_lab's: bitwise at N = 2 (both average exactly),
    to fp32 rounding at N = 3, 4 (the averages round in a different order; no sign bit differs)."""
    ds = DEEPSPEED[str(world)]
    ours = ds_lab.launch(w.deepspeed_probe_worker, world, 8)[0]
    assert ds["weights"][0] == ours[0]["weights"]  # DeepSpeed's first step() moved nothing
    assert ds["backward_allreduce"] == [True, True, False, False, False, False, False, False, False]
    assert [r["compressing"] for r in ours[1:]] == [False, False, True, True, True, True, True, True]
    for t in range(1, 9):
        for mine, theirs in zip(ours[t]["weights"], ds["weights"][t]):
            if world == 2:
                assert mine == theirs, t
            else:
                torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=0, atol=1e-6)
        assert ours[t]["loss"] == pytest.approx(ds["losses"][t], rel=1e-6, abs=0 if world == 2 else 1e-6)
