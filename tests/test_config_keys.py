"""Config keys DeepSpeed accepts that ds_lab once refused: their parsing, their defaults (DeepSpeed's),
their refusals (DeepSpeed's), and the gradient-reduction arithmetic they control (runtime/grad_reduce.py)."""
import dataclasses
import json
import pathlib
import warnings

import pytest
import torch

import ds_lab
from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.runtime.grad_reduce import GradientReduction
from tests import config_keys_workers as w

BATCH = {"train_batch_size": 8}

# Read from DeepSpeed 0.19.8's own models (DS_ACCELERATOR=cpu):
#   DeepSpeedZeroOffloadOptimizerConfig().model_dump(), DeepSpeedZeroOffloadParamConfig().model_dump()
#   (runtime/zero/offload_config.py), DeepSpeedZeroConfig() fields (runtime/zero/config.py),
#   WandbConfig() (monitor/config.py), DeepSpeedFlopsProfilerConfig({}) (profiling/config.py),
#   ACT_CHKPT_DEFAULT (runtime/activation_checkpointing/config.py), and runtime/config.py's getters.
DEEPSPEED_DEFAULTS = {
    "offload_optimizer": {"device": "none", "nvme_path": None, "buffer_count": 4, "pin_memory": True,
                          "pipeline_read": False, "pipeline_write": False, "fast_init": False, "ratio": 1.0},
    "offload_param": {"device": "none", "nvme_path": None, "buffer_count": 5, "buffer_size": 100_000_000,
                      "max_in_cpu": 1_000_000_000, "pin_memory": True},
    "zero_optimization": {"allgather_partitions": True, "round_robin_gradients": False,
                          "sub_group_size": 1_000_000_000, "stage3_gather_16bit_weights_on_model_save": False,
                          "use_multi_rank_bucket_allreduce": True, "ignore_unused_parameters": True,
                          "elastic_checkpoint": False, "load_from_fp32_weights": True,
                          "memory_efficient_linear": True},
    "wandb": {"enabled": False, "group": None, "team": None, "project": "deepspeed"},
    "flops_profiler": {"enabled": False, "recompute_fwd_factor": 0.0, "profile_step": 1, "module_depth": -1,
                       "top_modules": 1, "detailed": True, "output_file": None},
    "activation_checkpointing": {"partition_activations": False, "contiguous_memory_optimization": False,
                                 "cpu_checkpointing": False, "number_checkpoints": None,
                                 "synchronize_checkpoint_boundary": False, "profile": False},
    "top": {"prescale_gradients": False, "gradient_predivide_factor": 1.0, "communication_data_type": None,
            "zero_allow_untested_optimizer": False},
    "fp16_master_weights_and_grads": False,
    "grad_accum_dtype": None,
}


def parse(**extra):
    return DeepSpeedConfig.from_any({**BATCH, **extra})


def error_of(raw):
    with pytest.raises(ConfigError) as caught:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            DeepSpeedConfig.from_any(raw)
    return str(caught.value)


# ---------------------------------------------------------------- parsing and defaults

def test_defaults_are_deepspeeds():
    cfg = parse()
    zero = cfg.zero_optimization
    assert dataclasses.asdict(zero.offload_optimizer) == DEEPSPEED_DEFAULTS["offload_optimizer"]
    assert dataclasses.asdict(zero.offload_param) == DEEPSPEED_DEFAULTS["offload_param"]
    assert {k: getattr(zero, k) for k in DEEPSPEED_DEFAULTS["zero_optimization"]} == \
        DEEPSPEED_DEFAULTS["zero_optimization"]
    for section in ("wandb", "flops_profiler", "activation_checkpointing"):
        assert dataclasses.asdict(getattr(cfg, section)) == DEEPSPEED_DEFAULTS[section], section
    assert {k: getattr(cfg, k) for k in DEEPSPEED_DEFAULTS["top"]} == DEEPSPEED_DEFAULTS["top"]
    assert cfg.fp16.fp16_master_weights_and_grads is DEEPSPEED_DEFAULTS["fp16_master_weights_and_grads"]
    assert cfg.data_types.grad_accum_dtype is DEEPSPEED_DEFAULTS["grad_accum_dtype"]


def test_every_section_key_is_parsed():
    cfg = parse(wandb={"enabled": True, "group": "g", "team": "t", "project": "p"},
                flops_profiler={"enabled": True, "profile_step": 3, "module_depth": 2, "top_modules": 4,
                                "detailed": False, "output_file": "f.txt", "recompute_fwd_factor": 1.0},
                activation_checkpointing={"partition_activations": True, "contiguous_memory_optimization": True,
                                          "cpu_checkpointing": True, "number_checkpoints": 4,
                                          "synchronize_checkpoint_boundary": True, "profile": True},
                data_types={"grad_accum_dtype": "float32"}, zero_optimization={"stage": 2},
                bf16={"enabled": True}, communication_data_type="BF16", prescale_gradients=False,
                gradient_predivide_factor=1.0, zero_allow_untested_optimizer=True)
    assert (cfg.wandb.group, cfg.wandb.team, cfg.wandb.project) == ("g", "t", "p")
    assert (cfg.flops_profiler.profile_step, cfg.flops_profiler.module_depth, cfg.flops_profiler.output_file,
            cfg.flops_profiler.detailed) == (3, 2, "f.txt", False)
    assert cfg.activation_checkpointing.number_checkpoints == 4 and cfg.activation_checkpointing.cpu_checkpointing
    assert cfg.data_types.grad_accum_dtype == "fp32"  # DeepSpeed's DtypeEnum spellings, normalised
    assert cfg.communication_data_type == "bf16" and cfg.zero_allow_untested_optimizer


def test_offload_sections_and_the_legacy_spellings():
    zero = parse(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                    "offload_param": {"device": "cpu", "buffer_count": 2}}).zero_optimization
    assert (zero.offload_optimizer.device, zero.offload_optimizer.pin_memory) == ("cpu", False)
    assert (zero.offload_param.device, zero.offload_param.buffer_count) == ("cpu", 2)
    # DeepSpeed's deprecated cpu_offload / cpu_offload_param: new_param_fn -> device cpu, defaults otherwise
    with pytest.warns(UserWarning, match="cpu_offload_use_pin_memory is accepted but not enforced"):
        zero = parse(zero_optimization={"stage": 3, "cpu_offload": True, "cpu_offload_param": True,
                                        "cpu_offload_use_pin_memory": True}).zero_optimization
    assert zero.offload_optimizer == type(zero.offload_optimizer)(device="cpu")
    assert zero.offload_param == type(zero.offload_param)(device="cpu")
    assert parse(zero_optimization={"stage": 2, "cpu_offload": False}).zero_optimization.offload_optimizer.device \
        == "none"
    assert parse(zero_optimization={"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}) \
        .zero_optimization.stage3_gather_16bit_weights_on_model_save
    assert parse(zero_optimization={"stage": 1, "offload_optimizer": None}).zero_optimization \
        .offload_optimizer.device == "none"


def test_legacy_boolean_zero_optimization_is_stage_one_or_zero():
    with pytest.warns(UserWarning, match="deprecated"):
        assert parse(zero_optimization=True).zero_optimization.stage == 1
    with pytest.warns(UserWarning, match="deprecated"):
        assert parse(zero_optimization=False).zero_optimization.stage == 0
    with pytest.warns(UserWarning):
        cfg = DeepSpeedConfig.from_any({**BATCH, "zero_optimization": True, "allgather_size": 1000})
    assert cfg.zero_optimization.allgather_bucket_size == 1000
    assert "deprecated" in error_of({**BATCH, "allgather_size": 10})


@pytest.mark.parametrize("key", ["allgather_partitions", "round_robin_gradients", "sub_group_size",
                                 "use_multi_rank_bucket_allreduce", "ignore_unused_parameters",
                                 "elastic_checkpoint", "load_from_fp32_weights", "memory_efficient_linear"])
def test_no_op_zero_keys_are_accepted_with_a_warning_that_says_why(key):
    value = DEEPSPEED_DEFAULTS["zero_optimization"][key]
    value = (not value) if isinstance(value, bool) else 1000
    with pytest.warns(UserWarning, match=f"zero_optimization.{key} is accepted but not enforced"):
        cfg = parse(zero_optimization={"stage": 2, key: value})
    assert getattr(cfg.zero_optimization, key) == value


@pytest.mark.parametrize("raw, message", [
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
     "ds_lab has no NVMe/AIO offload; use device cpu"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
     "ds_lab has no NVMe/AIO offload; use device cpu"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "offload_param applies to ZeRO stage 3 only"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "needs ZeRO stage 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "must be 'none' or 'cpu'"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
     "partial offload) is not supported"),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}},
     "keep only 'offload_optimizer'"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"super_offload": True}}},
     "'super_offload' in 'zero_optimization.offload_optimizer' is a DeepSpeed config key"),
    ({"zero_optimization": {"stage": 2}, "gradient_predivide_factor": 2.0},
     "gradient_predivide_factor != 1.0 is not yet supported with ZeRO stage 2 with reduce scatter enabled"),
    ({"zero_optimization": {"stage": 3}, "prescale_gradients": True},
     "pre-scale gradients is not yet supported with ZeRO stage 3 with reduce scatter enabled"),
    ({"communication_data_type": "int8"}, "Invalid communication_data_type. Supported data types: "
                                          "['fp16', 'bf16', 'fp32']"),
    ({"gradient_predivide_factor": 0}, "gradient_predivide_factor must be a number > 0"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
     "Fp16_master_weights_and_grads is only supported with ZeRO Stage 1, 2, or 3"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}, "zero_optimization": {"stage": 2}},
     "Master weights feature requires ZeRO-2 Offload with DeepSpeedCPUAdam"),
    ({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
     "unsupported mix of model dtype bf16 and data_types.grad_accum_dtype fp32 without ZeRO"),
    ({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}},
     "'bf16' with fp32 training is not supported by ds_lab"),
    ({"data_types": {"grad_accum_dtype": "int8"}}, "data_types.grad_accum_dtype must be one of"),
    ({"flops_profiler": {"module_depth": -2}}, "flops_profiler.module_depth must be an integer >= -1"),
    ({"wandb": {"enabled": True, "entity": "x"}}, "unknown config key 'entity' in 'wandb'"),
])
def test_what_deepspeed_refuses_or_ds_lab_cannot_honour_is_a_clear_error(raw, message):
    assert message in error_of({**BATCH, **raw})


def test_fp16_master_weights_with_cpu_offload_is_accepted_and_says_what_it_does():
    with pytest.warns(UserWarning, match="fp16_master_weights_and_grads is accepted but not enforced"):
        cfg = parse(fp16={"enabled": True, "fp16_master_weights_and_grads": True},
                    zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert cfg.fp16.fp16_master_weights_and_grads


def test_predivide_at_stage_one_warns_that_deepspeed_ignores_it_there():
    with pytest.warns(UserWarning, match="do not change ZeRO stage 1"):
        parse(zero_optimization={"stage": 1}, gradient_predivide_factor=2.0)


def test_grad_accum_dtype_fp32_with_bf16_and_zero_is_accepted():
    cfg = parse(bf16={"enabled": True}, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"})
    assert cfg.data_types.grad_accum_dtype == "fp32"


# ---------------------------------------------------------------- the arithmetic, one process

def test_reduction_arithmetic_is_deepspeeds_allreduce_bucket():
    """Emulate N ranks' all-reduce with a sum and check each mode against DeepSpeed's formula."""
    torch.manual_seed(0)
    grads = [torch.randn(50) for _ in range(3)]

    def run(reduction):
        wires = [reduction.before_all_reduce(g.clone(), 3) for g in grads]
        total = wires[0] + wires[1] + wires[2]
        out = torch.empty(50)  # the fp32 gradient buffer the result is cast back into
        reduction.after_all_reduce(total, out, 3)
        return out

    g0, g1, g2 = grads
    assert torch.equal(run(GradientReduction()), (g0 + g1 + g2).mul_(1 / 3))  # postscale, f = 1
    assert torch.equal(run(GradientReduction(predivide=3.0)),  # f = N: no multiply after
                       g0.mul(1 / 3.0) + g1.mul(1 / 3.0) + g2.mul(1 / 3.0))
    assert torch.equal(run(GradientReduction(predivide=2.0)),
                       (g0.mul(0.5) + g1.mul(0.5) + g2.mul(0.5)).mul_(2.0 / 3))
    assert torch.equal(run(GradientReduction(prescale=True)), g0.mul(1 / 3) + g1.mul(1 / 3) + g2.mul(1 / 3))
    half = run(GradientReduction(dtype=torch.float16))
    assert half.dtype == torch.float32
    assert torch.equal(half, (g0.half() + g1.half() + g2.half()).mul_(1 / 3).float())
    reduction = GradientReduction(dtype=torch.bfloat16)
    wire = reduction.before_reduce_scatter(g0.clone(), 2)
    assert wire.dtype == torch.bfloat16 and torch.equal(wire, g0.bfloat16().div_(2))


def test_the_wire_dtype_follows_deepspeeds_default():
    def wire(**raw):
        return GradientReduction.from_config(parse(**raw)).dtype
    assert wire() == torch.float32
    assert wire(bf16={"enabled": True}) == torch.bfloat16
    assert wire(fp16={"enabled": True}) == torch.float16
    assert wire(communication_data_type="fp16") == torch.float16
    assert wire(bf16={"enabled": True}, communication_data_type="fp32") == torch.float32


# ---------------------------------------------------------------- multi-rank, against one process

BASE = {"train_batch_size": 12, "gradient_clipping": 0.0}
STEPS = w.data(3, 12)
ONE = STEPS[:1]


def local_grads(batch, world):
    """Each rank's own (un-averaged) fp32 gradient, computed here in one process."""
    model, (x, y) = w.mlp(), batch
    out = []
    for rank in range(world):
        model.zero_grad()
        w.loss_of(model(w.rank_rows(x, rank, world)), w.rank_rows(y, rank, world)).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def reference(batches, kind):
    """One process, the whole batch: what every data-parallel run must equal (to fp32 rounding)."""
    model = w.mlp()
    opt = torch.optim.SGD(model.parameters(), **w.SGD) if kind == "sgd" else \
        torch.optim.Adam(model.parameters(), **w.ADAM)
    losses = []
    for x, y in batches:
        loss = w.loss_of(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def sgd_step_from(grads):
    """The weights after one SGD-momentum step from the initial model with gradient `grads`."""
    model = w.mlp()
    opt = torch.optim.SGD(model.parameters(), **w.SGD)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


EQUIVALENCE = [({**BASE, "prescale_gradients": True}, "sgd"), ({**BASE, "prescale_gradients": True}, "adam"),
               ({**BASE, "gradient_predivide_factor": 2.0}, "sgd"),
               ({**BASE, "gradient_predivide_factor": 2.0}, "adam"),
               ({**BASE, "gradient_predivide_factor": 2.0, "zero_optimization": {"stage": 1}}, "sgd")]
EXACT = [({**BASE, "communication_data_type": "fp16"}, "sgd"), ({**BASE, "gradient_predivide_factor": 3.0}, "sgd"),
         ({**BASE}, "sgd")] + [({**BASE, "communication_data_type": "fp16", "zero_optimization": {"stage": s}}, "sgd")
                               for s in (1, 2, 3)] + \
        [({**BASE, "zero_optimization": {"stage": 1}}, "adam"),
         ({**BASE, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}, "sgd"),
         ({**BASE, "prescale_gradients": True}, "sgd")]


@pytest.fixture(scope="module")
def two():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [(c, STEPS, k) for c, k in EQUIVALENCE] + [(c, ONE, k) for c, k in EXACT]
        return ds_lab.launch(w.cases_worker, 2, cases)


@pytest.fixture(scope="module")
def three():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [(c, STEPS, k) for c, k in EQUIVALENCE] + [(c, ONE, k) for c, k in EXACT[:1]]
        return ds_lab.launch(w.cases_worker, 3, cases)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", range(len(EQUIVALENCE)))
def test_prescale_and_predivide_train_like_one_process(world, case, two, three):
    config, kind = EQUIVALENCE[case]
    losses, weights = reference(STEPS, kind)
    for rank_result in (two if world == 2 else three):
        r = rank_result[case]
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
        for n in weights:
            torch.testing.assert_close(r["weights"][n], weights[n], rtol=1e-5, atol=1e-6, msg=n)


def test_predivide_factor_arithmetic_is_deepspeeds_bit_for_bit(two):
    """World 2: x 1/3 before the all-reduce, x 3/2 after; the default: the sum, then x 1/2."""
    g0, g1 = local_grads(ONE[0], 2)
    predivide, default = two[0][len(EQUIVALENCE) + 1], two[0][len(EQUIVALENCE) + 2]
    differs = False
    for n in g0:
        expected = (g0[n].mul(1 / 3.0) + g1[n].mul(1 / 3.0)).mul_(3.0 / 2)
        assert torch.equal(predivide["grads"][0][n], expected), n
        plain = (g0[n] + g1[n]).mul_(1 / 2)
        assert torch.equal(default["grads"][0][n], plain), n
        differs |= not torch.equal(expected, plain)
    assert differs  # the factor really changes the rounding, so the test can tell the paths apart


def test_communication_data_type_fp16_sends_two_bytes_and_rounds_like_fp16(two, three):
    numel = sum(p.numel() for p in w.mlp().parameters())
    # stage 0, world 2: the fp16 sum of fp16-rounded gradients, x 1/2 in fp16, back to fp32 -- exactly
    g0, g1 = local_grads(ONE[0], 2)
    r = two[0][len(EQUIVALENCE)]
    assert r["records"][0] == [("all_reduce", "grad_allreduce", 2 * numel)]  # 2-byte elements
    fp32_fallback = two[0][len(EQUIVALENCE) + 2]
    assert fp32_fallback["records"][0] == [("all_reduce", "grad_allreduce", 4 * numel)]
    rounded = False
    for n in g0:
        expected = (g0[n].half() + g1[n].half()).mul_(1 / 2).float()
        assert torch.equal(r["grads"][0][n], expected), n
        rounded |= not torch.equal(expected, (g0[n] + g1[n]) / 2)
    assert rounded
    # world 3 (the sum's order is gloo's): within one fp16 rounding of the fp32 average
    parts = local_grads(ONE[0], 3)
    for n in parts[0]:
        exact = (parts[0][n] + parts[1][n] + parts[2][n]) / 3
        got = three[0][len(EQUIVALENCE)]["grads"][0][n]
        torch.testing.assert_close(got, exact, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_communication_data_type_fp16_with_zero_reduce_scatters_in_fp16(stage, two):
    """ZeRO divides by N after the cast, then reduce-scatters (DeepSpeed's average_tensor): the SGD step
    from that gradient is the one-process step from (fp16(g0)/2 + fp16(g1)/2), bit for bit."""
    numel = sum(p.numel() for p in w.mlp().parameters())
    r = two[0][len(EQUIVALENCE) + 2 + stage]
    assert sum(b for op, tag, b in r["records"][0] if op == "reduce_scatter") == 2 * numel
    g0, g1 = local_grads(ONE[0], 2)
    expected = sgd_step_from({n: (g0[n].half().div_(2) + g1[n].half().div_(2)).float() for n in g0})
    fp32 = sgd_step_from({n: (g0[n].div(2) + g1[n].div(2)) for n in g0})
    assert any(not torch.equal(expected[n], fp32[n]) for n in expected)
    for n in expected:
        torch.testing.assert_close(r["weights"][n], expected[n], rtol=0, atol=0, msg=n)


def test_an_untested_optimizer_with_zero_is_named_as_deepspeed_would_refuse_it(two):
    """DeepSpeed asserts for SGD with ZeRO unless zero_allow_untested_optimizer; ds_lab warns and runs it."""
    def untested(index):
        return [m for m in two[0][len(EQUIVALENCE) + index]["warnings"] if "untested ZeRO Optimizer" in m]
    assert untested(2) == []  # stage 0: no ZeRO, no check
    assert all("SGD" in m and "zero_allow_untested_optimizer" in m for m in untested(3)) and untested(3)
    assert untested(6) == []  # ZeRO-1 with the config's Adam: tested
    assert untested(7) == []  # the key given: DeepSpeed runs it too


def test_check_zero_optimizer_uses_deepspeeds_tested_list():
    from ds_lab.modes import check_zero_optimizer
    from ds_lab.optim import Adam, Lamb

    params = [torch.nn.Parameter(torch.zeros(2))]
    zero = parse(zero_optimization={"stage": 2})
    for optimizer in (torch.optim.Adam(params), torch.optim.AdamW(params), torch.optim.Adagrad(params),
                      Adam(params)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_zero_optimizer(zero, optimizer)
    for optimizer in (torch.optim.SGD(params, lr=0.1), Lamb(params)):
        with pytest.warns(UserWarning, match="untested ZeRO Optimizer"):
            check_zero_optimizer(zero, optimizer)


def test_stage0_gradients_equal_deepspeeds_bit_for_bit(two):
    """tests/deepspeed_grad_reduce.json holds DeepSpeed 0.19.8's averaged gradients for the same model,
    data and keys (world 2, fp32 model), written by this script under
    `DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2` and saved from rank 0:

        deepspeed.init_distributed(dist_backend="gloo"); rank, world = dist.get_rank(), dist.get_world_size()
        for name, extra in CASES.items():   # {} / gradient_predivide_factor 3.0 / communication_data_type
            model = w.mlp()                  #   "fp16" / prescale_gradients true
            cfg = {"train_batch_size": 12, "gradient_clipping": 0.0, **extra}
            engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                              optimizer=torch.optim.SGD(model.parameters(), **w.SGD))
            x, y = w.data(1, 12)[0]
            engine.backward(w.loss_of(engine(w.rank_rows(x, rank, world)), w.rank_rows(y, rank, world)))
            grads[name] = {n: p.grad.flatten().tolist() for n, p in engine.module.named_parameters()}

    (At world 3 the sums' order differs between DeepSpeed's CPU all-reduce and gloo: within 1 ulp.)"""
    recorded = json.loads((pathlib.Path(__file__).parent / "deepspeed_grad_reduce.json").read_text())["grads"]
    ours = {"fp16wire": 0, "predivide3": 1, "default": 2, "prescale": 8}
    for case, index in ours.items():
        grads = two[0][len(EQUIVALENCE) + index]["grads"][0]
        for n, g in grads.items():
            assert torch.equal(g.flatten(), torch.tensor(recorded[case][n], dtype=torch.float32)), (case, n)
