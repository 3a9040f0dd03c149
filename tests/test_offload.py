"""ZeRO-Offload (ds_lab/zero/offload.py): equal to one process, and the ledger shows what moved.

offload_optimizer at stages 1-3 and offload_param at stage 3, at 2 and 3 ranks (TINY's Ψ divides by
neither), with ds_lab's Adam and a client torch.optim.SGD with momentum: the losses and weights
equal a single-process PyTorch run, and equal bit for bit the same ds_lab run without offload
(the copies between host and device change no value). The memory table: with offload the master
weights and optimizer states are host bytes, counted exactly from the model's padded shards.
"""
import pytest
import torch

import ds_lab
from ds_lab import lab
from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.models import GPT, GPTConfig
from ds_lab.zero.offload import Offload
from tests import offload_workers
from tests.workers import TINY, make_batches

GLOBAL_BATCH, STEPS, BUCKET = 12, 3, 3000
CPU = {"device": "cpu", "pin_memory": True}
# (stage, offload_optimizer, offload_param): every mode, and each offloaded one next to its plain run
MODES = [(1, False, False), (1, True, False), (2, False, False), (2, True, False),
         (3, False, False), (3, True, False), (3, False, True), (3, True, True)]


def config(stage, offload_optimizer=False, offload_param=False, optimizer=None, bf16=False, batch=GLOBAL_BATCH):
    zero = {"stage": stage, "reduce_bucket_size": BUCKET}
    if offload_optimizer:
        zero["offload_optimizer"] = dict(CPU)
    if offload_param:
        zero["offload_param"] = dict(CPU)
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 200  # some units persistent (gathered after the step)
    cfg = {"train_batch_size": batch, "gradient_clipping": 1.0, "zero_optimization": zero}
    if optimizer is None:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


@pytest.fixture(scope="module")
def batches():
    return make_batches(STEPS, GLOBAL_BATCH, TINY["block_size"])


def close(result, reference):
    """As tests/test_zero.py: the losses to 1e-5 relative, the weights to fp32 rounding."""
    assert max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"])) <= 1e-5
    diffs = torch.cat([(result["weights"][k] - reference["weights"][k]).abs().flatten() for k in reference["weights"]])
    assert diffs.max().item() <= 1e-5
    assert (diffs > 1e-6).float().mean().item() < 1e-3


@pytest.mark.parametrize("optimizer", [None, "sgd"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_offload_equals_one_process_and_the_same_run_without_offload(world_size, optimizer, batches):
    reference = offload_workers.reference_train(batches, optimizer)
    configs = [config(*mode, optimizer=optimizer) for mode in MODES]
    results = ds_lab.launch(offload_workers.several_worker, world_size, configs, batches, optimizer)
    for rank_results in results:
        plain = {}
        for (stage, opt, param), r in zip(MODES, rank_results):
            assert r["offload"] == Offload(optimizer=opt, params=param)  # the config reached the mode
            assert r["optimizer_type"] == ("SGD" if optimizer else "Adam")
            assert r["state_on_masters"]  # the optimizer's state lives where its (host) master does
            close(r, reference)
            if not (opt or param):
                plain[stage] = r
                continue
            base = plain[stage]  # the copies change nothing: bit for bit the non-offloaded run
            assert r["losses"] == base["losses"], (stage, opt, param)
            assert all(torch.equal(r["weights"][k], base["weights"][k]) for k in base["weights"]), (stage, opt, param)


def _expected_placement(stage, world_size, opt, param):
    """Host and device bytes of each model-state category after a bf16 Adam step, predicted from
    the model's parameter sizes alone (the units: gradient buckets at stages 1-2, modules at 3)."""
    gpt = GPT(GPTConfig(**TINY))
    if stage == 3:  # each module's own parameters, a tied one counted with its first module only
        seen, padded = set(), 0
        for module in gpt.modules():
            own = [p for p in module._parameters.values() if p is not None and p not in seen]
            seen.update(own)
            padded += lab.padded(sum(p.numel() for p in own), world_size) if own else 0
    else:
        padded = sum(lab.padded(b, world_size) for b in lab.bucket_sizes(gpt, BUCKET))
    shard = padded // world_size  # elements of this rank's shard
    where = lambda offloaded, nbytes: {"host": nbytes, "device": 0} if offloaded else {"host": 0, "device": nbytes}
    params = 2 * shard if stage == 3 else 2 * padded  # bf16; stage 3: only the chunks (nothing persistent)
    grads = 2 * padded if stage == 1 else 2 * shard  # bf16 on the device: the full buffer, or the shard
    return dict(params=where(param, params),
                grads={"host": 4 * shard if opt else 0, "device": grads},  # + the fp32 host gradient buffer
                master_params=where(opt, 4 * shard), optimizer_states=where(opt, 8 * shard))


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ledger_shows_what_moved_to_the_host(world_size):
    configs = [config(*mode, bf16=True, batch=world_size) for mode in MODES]
    for cfg in configs:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    batches = make_batches(1, world_size, TINY["block_size"])
    for rank_results in ds_lab.launch(offload_workers.several_worker, world_size, configs, batches):
        for (stage, opt, param), r in zip(MODES, rank_results):
            placement = r["memory"]["placement"]
            expected = _expected_placement(stage, world_size, opt, param)
            assert {c: placement[c] for c in expected} == expected, (stage, opt, param, placement)
            # every category's total is the sum of its two places; the totals keep their meaning
            assert all(r["memory"][c] == p["host"] + p["device"] for c, p in placement.items())
            assert r["memory"]["master_params"] + r["memory"]["optimizer_states"] == 12 * r["shard_elements"]


def test_offload_config_errors_name_the_fix():
    batch = {"train_batch_size": 2}
    with pytest.raises(ConfigError, match="stage 3"):
        DeepSpeedConfig.from_any({**batch, "zero_optimization": {"stage": 2, "offload_param": CPU}}, world_size=1)
    with pytest.raises(ConfigError, match="cpu"):
        DeepSpeedConfig.from_any({**batch, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
                                 world_size=1)
    legacy = DeepSpeedConfig.from_any({**batch, "zero_optimization": {"stage": 2, "cpu_offload": True}}, world_size=1)
    assert Offload.from_config(legacy.zero_optimization) == Offload(optimizer=True)
    assert Offload.from_config(DeepSpeedConfig.from_any(batch, world_size=1).zero_optimization) == Offload()


def test_pin_memory_pins_host_buffers_only_where_cuda_can():
    buffer = Offload(optimizer=True, pin_memory=True).host_zeros(10, torch.float32)
    assert buffer.device.type == "cpu" and buffer.is_pinned() == torch.cuda.is_available()
    assert not Offload(optimizer=True, pin_memory=False).host_zeros(10, torch.float32).is_pinned()


def test_offload_with_fp16_loss_scaling_and_accumulation_is_bitwise_the_plain_run(batches):
    """Accumulation (gradients summed on the device over micro-steps, copied to the host once) and
    fp16 (the overflow check on the device gradients, unscaling on the host copy) change nothing."""
    modes = [(2, False, False), (2, True, False), (3, False, False), (3, True, True)]
    configs = [{**config(*mode), "gradient_accumulation_steps": 2, "fp16": {"enabled": True, "initial_scale_power": 8}}
               for mode in modes]
    for rank_results in ds_lab.launch(offload_workers.several_worker, 2, configs, batches):
        for plain, offloaded in (rank_results[0:2], rank_results[2:4]):
            assert offloaded["offload"].optimizer and not plain["offload"].any
            assert offloaded["losses"] == plain["losses"]
            assert all(torch.equal(offloaded["weights"][k], v) for k, v in plain["weights"].items())


def test_offloaded_checkpoint_resumes_at_another_world_size_with_the_same_losses(tmp_path):
    """Saved from host-resident masters, optimizer states and parameter chunks at 2 ranks, loaded
    at 3 (resharded)."""
    from tests import workers
    steps = make_batches(4, GLOBAL_BATCH, TINY["block_size"], seed=9)
    cfg = config(3, offload_optimizer=True, offload_param=True)
    straight = ds_lab.launch(workers.checkpoint_worker, 2, cfg, steps, str(tmp_path / "unused"))[0]["losses"]
    ds_lab.launch(workers.checkpoint_worker, 2, cfg, steps[:2], str(tmp_path / "ck"))
    resumed = ds_lab.launch(workers.checkpoint_worker, 3, cfg, steps[2:], str(tmp_path / "ck"),
                            resume=True)[0]["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(resumed, straight[2:])) <= 1e-5
