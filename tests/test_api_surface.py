"""DeepSpeed's module-level API as scripts call it (issue 13): add_config_arguments, initialize's
signature, the accelerator, RepeatingLoader, set_random_seed, moe.utils, ops.adam, the wandb monitor."""
import argparse
import inspect
import random
import subprocess
import sys
import types

import pytest
import torch

import ds_lab
from tests import api_surface_workers as workers


# ---------------------------------------------------------------- add_config_arguments, initialize

def test_add_config_arguments_adds_deepspeeds_group_and_a_missing_local_rank():
    parser = ds_lab.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert vars(args) == {"deepspeed": False, "deepspeed_config": None, "deepscale": False,
                          "deepscale_config": None, "local_rank": -1}
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json", "--local_rank=3"])
    assert (args.deepspeed, args.deepspeed_config, args.local_rank) == (True, "ds.json", 3)
    group = next(g for g in parser._action_groups if g.title == "DeepSpeed")
    assert [a.dest for a in group._group_actions] == ["deepspeed", "deepspeed_config", "deepscale", "deepscale_config"]


def test_add_config_arguments_leaves_a_scripts_own_local_rank_alone():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0, help="mine")
    parser = ds_lab.add_config_arguments(parser)
    assert parser.parse_args([]).local_rank == 0
    assert sum("--local_rank" in a.option_strings for a in parser._actions) == 1


def test_initialize_has_deepspeeds_signature_and_order():
    expected = [("args", None), ("model", None), ("optimizer", None), ("model_parameters", None),
                ("training_data", None), ("lr_scheduler", None), ("distributed_port", 29500), ("mpu", None),
                ("dist_init_required", None), ("collate_fn", None), ("config", None), ("mesh_param", None),
                ("config_params", None)]
    parameters = inspect.signature(ds_lab.initialize).parameters.values()
    assert [(p.name, p.default) for p in parameters] == expected


class _Stop(Exception):
    pass


def test_deprecated_deepscale_config_is_honoured_and_distributed_port_becomes_master_port(monkeypatch):
    seen = {}

    def fake_init(*args, **kwargs):
        import os
        seen["port"] = os.environ.get("MASTER_PORT")
        raise _Stop

    monkeypatch.setattr(ds_lab, "init_distributed", fake_init)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    args = argparse.Namespace(deepspeed_config=None, deepscale_config="legacy.json")
    with pytest.warns(UserWarning, match="deepscale_config is deprecated"), pytest.raises(_Stop):
        ds_lab.initialize(args, torch.nn.Linear(2, 2), None, None, None, None, 29517)
    assert (args.deepspeed_config, args.deepscale_config) == ("legacy.json", None)
    assert seen["port"] == "29517"
    both = argparse.Namespace(deepspeed_config="a.json", deepscale_config="b.json")
    with pytest.warns(UserWarning), pytest.raises(ds_lab.ConfigError, match="keep --deepspeed_config"):
        ds_lab.initialize(both, torch.nn.Linear(2, 2))


def test_mesh_param_is_refused_with_the_reason():
    with pytest.raises(ds_lab.ConfigError, match="sequence parallelism"):
        ds_lab.initialize(model=torch.nn.Linear(2, 2), config={"train_batch_size": 1}, mesh_param=(2, 1))


# ---------------------------------------------------------------- accelerator

@pytest.fixture
def fresh_accelerator(monkeypatch):
    import ds_lab.accelerator as accelerator
    monkeypatch.setattr(accelerator, "_current", None)
    return accelerator


def test_cpu_accelerator_answers_like_deepspeeds(fresh_accelerator, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    acc = fresh_accelerator.get_accelerator()
    assert acc is fresh_accelerator.get_accelerator() and isinstance(acc, fresh_accelerator.CPU_Accelerator)
    assert (acc.device_name(), acc.device_name(1), acc.current_device_name()) == ("cpu", "cpu", "cpu")
    assert acc.communication_backend_name() == "gloo" and acc.is_available() and acc.device_count() >= 1
    assert acc.is_bf16_supported() and torch.bfloat16 in acc.supported_dtypes()
    assert acc.on_accelerator(torch.zeros(1)) and acc.pin_memory(t := torch.zeros(2)) is t
    acc.manual_seed(7)
    first = torch.randn(4)
    acc.manual_seed_all(7)
    assert torch.equal(first, torch.randn(4)) and acc.initial_seed() == 7 and acc.random() is torch.random
    with pytest.raises(NotImplementedError, match="torch.cuda.Event"):
        acc.Event()


def test_cpu_accelerator_memory_is_this_processs_rss(fresh_accelerator, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    acc = fresh_accelerator.get_accelerator()
    acc.reset_peak_memory_stats()
    before = acc.memory_allocated()
    block = torch.ones(40_000_000)  # 160 MB, touched
    grown = acc.memory_allocated() - before
    assert 120e6 < grown < 240e6, grown
    del block
    assert acc.max_memory_allocated() >= before + grown
    assert acc.total_memory() >= acc.available_memory() > 0


def test_ds_accelerator_env_chooses_and_an_unknown_name_is_refused(fresh_accelerator, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "tpu")
    with pytest.raises(ValueError, match="DS_ACCELERATOR='tpu'"):
        fresh_accelerator.get_accelerator()
    if not torch.cuda.device_count() > 0:
        monkeypatch.setenv("DS_ACCELERATOR", "cuda")
        with pytest.raises(ValueError, match="set DS_ACCELERATOR=cpu"):
            fresh_accelerator.get_accelerator()


def test_a_fresh_import_reaches_deepspeeds_names_and_creates_no_cuda_context():
    code = ("import torch, ds_lab as deepspeed\n"
            "a = deepspeed.accelerator.get_accelerator(); a.device_name(); a.communication_backend_name()\n"
            "names = (deepspeed.ops.adam.FusedAdam, deepspeed.ops.adam.DeepSpeedCPUAdam, deepspeed.utils.RepeatingLoader,"
            " deepspeed.runtime.utils.set_random_seed, deepspeed.add_config_arguments,"
            " deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer)\n"
            "print(a.device_name(), torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name, initialised = out.stdout.split()
    assert name == ("cuda" if torch.cuda.device_count() > 0 else "cpu") and initialised == "False"


def test_cuda_accelerator_names_devices_like_deepspeed():
    from ds_lab.accelerator import CUDA_Accelerator
    acc = CUDA_Accelerator()  # building it touches nothing
    assert (acc.device_name(), acc.device_name(2), acc.communication_backend_name()) == ("cuda", "cuda:2", "nccl")


# ---------------------------------------------------------------- utils, runtime.utils, moe.utils

def test_repeating_loader_restarts_its_loader():
    loader = ds_lab.utils.RepeatingLoader([1, 2, 3])
    assert [next(loader) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1] and iter(loader) is loader
    data = torch.utils.data.DataLoader(torch.arange(5), batch_size=2)
    loader = ds_lab.utils.RepeatingLoader(data)
    assert [next(loader).tolist() for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]
    with pytest.raises(StopIteration):
        next(ds_lab.utils.RepeatingLoader([]))


def test_set_random_seed_seeds_python_numpy_and_torch():
    np = pytest.importorskip("numpy")
    draws = []
    for _ in range(2):
        ds_lab.runtime.utils.set_random_seed(2 ** 70 + 5)  # too large for numpy and torch: taken modulo, as DeepSpeed
        draws.append((random.random(), float(np.random.rand()), torch.rand(1).item()))
    assert draws[0] == draws[1]
    ds_lab.runtime.utils.set_random_seed(6)
    assert random.random() != draws[0][0]


def test_moe_split_hands_the_groups_back_unchanged():
    from ds_lab.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer as split
    p = torch.nn.Parameter(torch.zeros(2))
    group = {"params": [p], "weight_decay": 0.1}
    assert split(group) == [group] and split(group)[0] is group
    groups = [group, {"params": [], "lr": 1.0}]
    assert split(groups) is groups and split(tuple(groups)) == groups
    assert split(groups, max_group_size=10) is groups and not is_moe_param(p)
    with pytest.raises(ValueError, match="Unknown param group type"):
        split("params")


# ---------------------------------------------------------------- ops.adam

def _against_torch(make, reference, steps=10, dtype=torch.float32):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7, 5).to(dtype)), torch.nn.Parameter(torch.randn(11).to(dtype))]
    theirs = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
    a, b = make(ours), reference(theirs)
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        a.step(), b.step()
        if dtype != torch.float32:  # the reference sees what the bf16 params hold
            with torch.no_grad():
                for p, q in zip(ours, theirs):
                    q.copy_(p.float())
    return max((p.float() - q).abs().max().item() for p, q in zip(ours, theirs))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("w_mode", [True, False])
def test_fused_and_cpu_adam_equal_torch_adam(weight_decay, w_mode):
    from ds_lab.ops.adam import DeepSpeedCPUAdam, FusedAdam
    torch_cls = torch.optim.AdamW if w_mode else torch.optim.Adam
    reference = lambda ps: torch_cls(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay)  # noqa
    fused = lambda ps: FusedAdam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay,  # noqa
                                 adam_w_mode=w_mode)
    cpu = lambda ps: DeepSpeedCPUAdam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay,  # noqa
                                      adamw_mode=w_mode)
    assert _against_torch(fused, reference) < 1e-6
    assert _against_torch(cpu, reference) < 1e-6


def test_adam_ops_keep_deepspeeds_signatures_and_refuse_amsgrad():
    from ds_lab.ops.adam import DeepSpeedCPUAdam, FusedAdam
    fused = inspect.signature(FusedAdam).parameters
    assert [(n, p.default) for n, p in fused.items()][1:] == [
        ("lr", 1e-3), ("bias_correction", True), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("adam_w_mode", True),
        ("weight_decay", 0.), ("amsgrad", False), ("set_grad_none", True)]
    cpu = inspect.signature(DeepSpeedCPUAdam).parameters
    assert list(cpu)[0] == "model_params" and [(n, p.default) for n, p in cpu.items()][1:] == [
        ("lr", 1e-3), ("bias_correction", True), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0),
        ("amsgrad", False), ("adamw_mode", True), ("fp32_optimizer_states", True)]
    p = torch.nn.Parameter(torch.zeros(2))
    for cls in (FusedAdam, DeepSpeedCPUAdam):
        with pytest.raises(RuntimeError, match="AMSGrad"):
            cls([p], amsgrad=True)
    optimizer = FusedAdam([p])
    p.grad = torch.ones(2)
    optimizer.zero_grad()
    assert p.grad is None


def test_cpu_adam_on_bf16_params_computes_in_fp32():
    from ds_lab.ops.adam import DeepSpeedCPUAdam
    make = lambda ps: DeepSpeedCPUAdam(ps, lr=0.01, weight_decay=0.1)  # noqa
    reference = lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)  # noqa
    assert _against_torch(make, reference, steps=5, dtype=torch.bfloat16) < 1e-6


@pytest.mark.parametrize("client, stage", [("FusedAdam", 0), ("DeepSpeedCPUAdam", 0), ("FusedAdam", 2)])
def test_adam_ops_as_client_optimizers_two_ranks_equal_one(client, stage):
    config = {"train_batch_size": workers.GLOBAL_BATCH, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}}
    kwargs = {"lr": 0.02, "weight_decay": 0.05}
    one = ds_lab.launch(workers.train_worker, 1, config, client, 4, kwargs)[0]
    two = ds_lab.launch(workers.train_worker, 2, config, client, 4, kwargs)
    assert one["optimizer"] == client and one["losses"][-1] < one["losses"][0]
    for rank in two:
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert torch.allclose(rank["weights"], one["weights"], atol=1e-6)


# ---------------------------------------------------------------- wandb monitor

def _wandb_config(enabled=True):
    section = types.SimpleNamespace(enabled=enabled, group="g1", team="my-team", project="proj")
    off = types.SimpleNamespace(enabled=False, output_path="", job_name="x")
    return types.SimpleNamespace(csv_monitor=off, tensorboard=off, wandb=section)


def test_wandb_without_the_package_says_how_to_install_it(monkeypatch):
    from ds_lab.monitor.monitors import build_monitors
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, installed or not
    with pytest.raises(ds_lab.ConfigError, match="pip install wandb"):
        build_monitors(_wandb_config(), rank=0)
    assert build_monitors(_wandb_config(), rank=1) == []  # only rank 0 logs
    assert build_monitors(_wandb_config(enabled=False), rank=0) == []


def test_wandb_inits_offline_on_rank_0_and_logs_each_event(monkeypatch):
    from ds_lab.monitor.monitors import build_monitors
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.log = lambda data, step=None: calls.append(("log", data, step))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    [monitor] = build_monitors(_wandb_config(), rank=0)
    monitor.write([("Train/Samples/train_loss", 2.5, 16), ("Train/Samples/lr", 0.1, 16)])
    assert calls == [("init", {"mode": "offline", "project": "proj", "group": "g1", "entity": "my-team"}),
                     ("log", {"Train/Samples/train_loss": 2.5}, 16), ("log", {"Train/Samples/lr": 0.1}, 16)]


def test_the_configs_wandb_section_reaches_the_monitor(monkeypatch):
    from ds_lab.monitor.monitors import build_monitors
    config = ds_lab.DeepSpeedConfig.from_any({"train_batch_size": 1, "wandb": {"enabled": True, "project": "p"}})
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert len(build_monitors(config, rank=0)) == 1
    assert calls == [{"mode": "disabled", "project": "p", "group": None, "entity": None}]


def test_initialize_with_wandb_enabled_and_no_package_fails_clearly():
    try:  # wandb is not a dependency of ds_lab
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    message = ds_lab.launch(workers.error_worker, 1, {"train_batch_size": 2, "wandb": {"enabled": True}})[0]
    assert "pip install wandb" in message
