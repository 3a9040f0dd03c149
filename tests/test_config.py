"""Specification of ds_lab.config: DeepSpeed JSON in, validated dataclasses out, clear errors otherwise."""
import json
from dataclasses import fields

import pytest
from hypothesis import given, settings, strategies as st

from ds_lab import config as config_module
from ds_lab.config import (BF16Config, CommsLoggerConfig, ConfigError, DeepSpeedConfig, FP16Config, MonitorConfig,
                           ZeroConfig)

BATCH = {"train_batch_size": 8}


def parse(world_size=1, **raw):
    return DeepSpeedConfig.from_any({**BATCH, **raw}, world_size=world_size)


def error_of(raw, world_size=1) -> str:
    with pytest.raises(ConfigError) as caught:
        DeepSpeedConfig.from_any(raw, world_size=world_size)
    return str(caught.value)


# ---------------------------------------------------------------- batch sizes

@pytest.mark.parametrize("given_keys, world_size, expected", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 4}, 2, (32, 4, 4)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}, 2, (32, 4, 4)),
    ({"train_batch_size": 12}, 3, (12, 4, 1)),
    ({"train_micro_batch_size_per_gpu": 5}, 3, (15, 5, 1)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 3, (24, 4, 2)),
    ({"train_batch_size": 8.0}, 1, (8, 8, 1)),  # JSON may write whole numbers as floats
])
def test_the_third_batch_value_is_inferred_from_the_other_two(given_keys, world_size, expected):
    cfg = DeepSpeedConfig.from_any(given_keys, world_size=world_size)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == expected


def test_inconsistent_batch_sizes_show_the_product_and_what_to_change():
    message = error_of({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                        "gradient_accumulation_steps": 2}, world_size=2)
    assert message == ("train_batch_size 32 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 x "
                       "data-parallel world size 2 (= 16); change one of them so the product holds")


def test_train_batch_not_divisible_by_micro_times_world_names_the_divisor():
    message = error_of({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 3}, world_size=1)
    assert "train_batch_size 10 is not divisible by train_micro_batch_size_per_gpu 3 x data-parallel world size 1" \
        in message and "(= 3)" in message and "gradient_accumulation_steps comes out whole" in message


def test_train_batch_not_divisible_by_accumulation_times_world():
    message = error_of({"train_batch_size": 10, "gradient_accumulation_steps": 2}, world_size=3)
    assert "not divisible by gradient_accumulation_steps 2 x data-parallel world size 3 (= 6)" in message
    assert "train_micro_batch_size_per_gpu comes out whole" in message


def test_train_batch_alone_must_divide_by_world_size():
    assert "not divisible" in error_of({"train_batch_size": 10}, world_size=4)


@pytest.mark.parametrize("raw", [{}, {"gradient_accumulation_steps": 4}])
def test_missing_batch_size_says_which_keys_to_set(raw):
    message = error_of(raw)
    assert "set train_batch_size or train_micro_batch_size_per_gpu" in message


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu"])
@pytest.mark.parametrize("value", [0, -4, 2.5, "8", True])
def test_batch_sizes_must_be_positive_integers(key, value):
    assert f"{key} must be an integer >= 1" in error_of({key: value})


def test_auto_placeholder_is_explained():
    assert "Hugging Face Trainer placeholder" in error_of({"train_batch_size": "auto"})


def test_world_size_must_be_positive():
    assert "world_size must be an integer >= 1" in error_of(BATCH, world_size=0)


@settings(max_examples=60, deadline=None)
@given(micro=st.integers(1, 64), accumulation=st.integers(1, 16), world_size=st.integers(1, 9),
       drop=st.sampled_from([None, "train_batch_size", "train_micro_batch_size_per_gpu",
                             "gradient_accumulation_steps"]))
def test_any_consistent_triple_round_trips(micro, accumulation, world_size, drop):
    raw = {"train_batch_size": micro * accumulation * world_size, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": accumulation}
    raw.pop(drop, None)
    cfg = DeepSpeedConfig.from_any(raw, world_size=world_size)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == \
        (micro * accumulation * world_size, micro, accumulation)


# ---------------------------------------------------------------- defaults

def test_defaults_match_deepspeed_source():
    cfg = parse()
    assert cfg.gradient_clipping == 1.0  # DeepSpeed PR #8068; its docs still say 0
    assert cfg.steps_per_print is None
    assert cfg.wall_clock_breakdown is False
    assert cfg.optimizer is None and cfg.scheduler is None
    assert cfg.fp16 == FP16Config(enabled=False, auto_cast=False, loss_scale=0.0, initial_scale_power=16,
                                  loss_scale_window=1000, hysteresis=2, consecutive_hysteresis=False,
                                  min_loss_scale=1.0)
    assert cfg.bf16 == BF16Config(enabled=False)
    assert cfg.zero_optimization == ZeroConfig(
        stage=0, reduce_bucket_size=500_000_000, allgather_bucket_size=500_000_000, overlap_comm=None,
        contiguous_gradients=True, reduce_scatter=True, stage3_prefetch_bucket_size=50_000_000,
        stage3_param_persistence_threshold=100_000, stage3_max_live_parameters=1_000_000_000,
        stage3_max_reuse_distance=1_000_000_000)
    assert cfg.comms_logger == CommsLoggerConfig(enabled=False, verbose=False, prof_all=True, debug=False,
                                                 prof_ops=[])
    assert cfg.csv_monitor == cfg.tensorboard == MonitorConfig(enabled=False, output_path="",
                                                               job_name="DeepSpeedJobName")
    assert cfg.precision == "fp32"


def test_every_dataclass_field_has_a_checker_and_a_documented_default():
    pairs = [(FP16Config, config_module._FP16_CHECKERS), (BF16Config, config_module._BF16_CHECKERS),
             (ZeroConfig, config_module._ZERO_CHECKERS), (CommsLoggerConfig, config_module._COMMS_LOGGER_CHECKERS),
             (MonitorConfig, config_module._MONITOR_CHECKERS)]
    for cls, checkers in pairs:
        assert [f.name for f in fields(cls)] == list(checkers)
        for f in fields(cls):
            assert f.name in config_module.__doc__, f"{cls.__name__}.{f.name} missing from the defaults table"


def test_given_values_override_defaults_and_whole_floats_become_ints():
    cfg = parse(zero_optimization={"reduce_bucket_size": 2e8, "overlap_comm": False},
                fp16={"enabled": True, "loss_scale": 128, "initial_scale_power": 12},
                gradient_clipping=0, steps_per_print=10, tensorboard={"enabled": True, "output_path": "runs"},
                comms_logger={"enabled": True, "prof_ops": ["all_reduce"]})
    assert cfg.zero_optimization.reduce_bucket_size == 200_000_000
    assert isinstance(cfg.zero_optimization.reduce_bucket_size, int)
    assert cfg.zero_optimization.overlap_comm is False
    assert (cfg.fp16.enabled, cfg.fp16.loss_scale, cfg.fp16.initial_scale_power) == (True, 128.0, 12)
    assert (cfg.gradient_clipping, cfg.steps_per_print) == (0.0, 10)
    assert cfg.tensorboard.output_path == "runs" and cfg.comms_logger.prof_ops == ["all_reduce"]
    assert cfg.precision == "fp16"


def test_bf16_precision():
    assert parse(bf16={"enabled": True}).precision == "bf16"


# ---------------------------------------------------------------- unknown and unsupported keys

@pytest.mark.parametrize("raw, expected", [
    ({"train_batch_szie": 8, "train_micro_batch_size_per_gpu": 8},
     "unknown config key 'train_batch_szie'; did you mean 'train_batch_size'?"),
    ({**BATCH, "zero_optimization": {"stgae": 0}},
     "unknown config key 'stgae' in 'zero_optimization'; did you mean 'stage'?"),
    ({**BATCH, "fp16": {"enabeld": True}}, "unknown config key 'enabeld' in 'fp16'; did you mean 'enabled'?"),
    ({**BATCH, "Gradient_Clipping": 1.0}, "did you mean 'gradient_clipping'?"),
    ({**BATCH, "comms_logger": {"prof_op": []}}, "did you mean 'prof_ops'?"),
    ({**BATCH, "csv_monitor": {"jobname": "x"}}, "did you mean 'job_name'?"),
    ({**BATCH, "optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}},
     "unknown config key 'weight_decy' in 'optimizer.params'; did you mean 'weight_decay'?"),
    ({**BATCH, "zero_optimization": {"prefetch_bucket_size": 1}}, "did you mean 'stage3_prefetch_bucket_size'?"),
])
def test_unknown_keys_suggest_the_nearest_valid_one(raw, expected):
    assert expected in error_of(raw)


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    message = error_of({**BATCH, "bf16": {"zzz": 1}})
    assert "unknown config key 'zzz' in 'bf16'; valid: enabled" in message


@pytest.mark.parametrize("key", [
    "amp", "compression_training", "data_efficiency", "aio", "sparse_attention", "elasticity", "autotuning",
    "checkpoint", "comet", "zero_force_ds_cpu_optimizer", "seq_parallel_communication_data_type", "dump_state",
    "memory_breakdown", "sparse_gradients", "fp32_allreduce", "compile", "torch_autocast",
])
def test_deepspeed_top_level_keys_are_named_as_not_supported_yet(key):
    assert f"'{key}' is a DeepSpeed config key that ds_lab does not support yet" in error_of({**BATCH, key: {}})


def test_old_bfloat16_name_points_to_bf16():
    assert "write 'bf16'" in error_of({**BATCH, "bfloat16": {"enabled": True}})


@pytest.mark.parametrize("section, key", [
    ("zero_optimization", "zero_quantized_weights"), ("zero_optimization", "zenflow"), ("fp16", "fused_mode"),
    ("bf16", "immediate_grad_update"),
])
def test_deepspeed_keys_inside_sections_are_named_as_not_supported_yet(section, key):
    message = error_of({**BATCH, section: {key: True}})
    assert f"'{key}' in '{section}' is a DeepSpeed config key that ds_lab does not support yet" in message


def test_max_grad_norm_points_to_gradient_clipping():
    message = error_of({**BATCH, "optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}})
    assert "set the top-level 'gradient_clipping' instead" in message


# ---------------------------------------------------------------- zero, precision, types

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_is_accepted(stage):
    assert parse(zero_optimization={"stage": stage}).zero_optimization.stage == stage


def test_zero_stage_out_of_range_and_non_dict_zero_section():
    assert "must be 0, 1, 2 or 3" in error_of({**BATCH, "zero_optimization": {"stage": 4}})
    assert "'zero_optimization' must be a JSON object" in error_of({**BATCH, "zero_optimization": 3})


def test_fp16_and_bf16_cannot_both_be_enabled():
    message = error_of({**BATCH, "fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert message == "fp16 and bf16 are both enabled; set one of them to false"


@pytest.mark.parametrize("raw, expected", [
    ({"gradient_clipping": -1.0}, "gradient_clipping must be a number >= 0, got -1.0"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping must be a number >= 0"),
    ({"gradient_clipping": True}, "gradient_clipping must be a number >= 0"),
    ({"wall_clock_breakdown": 1}, "wall_clock_breakdown must be true or false"),
    ({"steps_per_print": 0}, "steps_per_print must be an integer >= 1"),
    ({"fp16": {"enabled": "yes"}}, "fp16.enabled must be true or false"),
    ({"fp16": {"loss_scale_window": 0}}, "fp16.loss_scale_window must be an integer >= 1"),
    ({"fp16": {"min_loss_scale": 0}}, "fp16.min_loss_scale must be a number > 0"),
    ({"zero_optimization": {"reduce_bucket_size": 1.5}}, "zero_optimization.reduce_bucket_size must be an integer"),
    ({"zero_optimization": {"overlap_comm": "true"}}, "zero_optimization.overlap_comm must be true or false"),
    ({"comms_logger": {"prof_ops": "all_reduce"}}, "comms_logger.prof_ops must be a list of strings"),
    ({"tensorboard": {"output_path": 3}}, "tensorboard.output_path must be a string"),
    ({"fp16": []}, "'fp16' must be a JSON object"),
])
def test_values_are_type_checked(raw, expected):
    assert expected in error_of({**BATCH, **raw})


# ---------------------------------------------------------------- optimizer

@pytest.mark.parametrize("given_type, params, expected_type", [
    ("adamw", {}, "AdamW"),
    ("ADAM", {}, "AdamW"),  # DeepSpeed's "Adam" means AdamW unless adam_w_mode is false
    ("Adam", {"adam_w_mode": False}, "Adam"),
    ("AdamW", {"adam_w_mode": True}, "AdamW"),
])
def test_optimizer_type_is_the_effective_adam_variant(given_type, params, expected_type):
    cfg = parse(optimizer={"type": given_type, "params": params})
    assert cfg.optimizer.type == expected_type
    assert "adam_w_mode" not in cfg.optimizer.params


def test_optimizer_params_get_fused_adam_defaults():
    cfg = parse(optimizer={"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95]}})
    assert cfg.optimizer.params == {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}


def test_adamw_with_adam_w_mode_false_is_a_contradiction():
    message = error_of({**BATCH, "optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}})
    assert "adam_w_mode is false but optimizer.type is 'AdamW'" in message


@pytest.mark.parametrize("name", ["ZeroOneAdam", "OneBitLamb", "Adagrad", "Lion", "MuAdam"])
def test_other_deepspeed_optimizers_are_not_supported_yet(name):
    message = error_of({**BATCH, "optimizer": {"type": name}})
    assert "is not supported by ds_lab yet; supported: Adam, AdamW, " in message
    assert message.startswith("DeepSpeed optimizer '")


def test_torch_optimizer_names_are_not_supported_yet():
    assert "optimizer 'SGD' (DeepSpeed takes it from torch.optim) is not supported by ds_lab yet" in \
        error_of({**BATCH, "optimizer": {"type": "SGD"}})


def test_misspelled_optimizer_gets_a_suggestion():
    assert "unknown optimizer type 'Adma'; did you mean 'Adam'?" in error_of({**BATCH, "optimizer": {"type": "Adma"}})


def test_optimizer_needs_a_type_and_checks_param_values():
    assert "'optimizer' needs a 'type'" in error_of({**BATCH, "optimizer": {"params": {}}})
    assert "optimizer.params.betas must be a list of two numbers" in \
        error_of({**BATCH, "optimizer": {"type": "Adam", "params": {"betas": [0.9, 1.5]}}})
    assert "optimizer.params.lr must be a number >= 0" in \
        error_of({**BATCH, "optimizer": {"type": "Adam", "params": {"lr": -1}}})


# ---------------------------------------------------------------- scheduler

@pytest.mark.parametrize("name, params", [
    ("WarmupLR", {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 10}),
    ("WarmupDecayLR", {"total_num_steps": 100, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 100, "cos_min_ratio": 0.1, "warmup_min_ratio": 0.0}),
])
def test_supported_schedulers_are_accepted(name, params):
    cfg = parse(scheduler={"type": name, "params": params})
    assert (cfg.scheduler.type, cfg.scheduler.params) == (name, params)


def test_torch_scheduler_names_are_not_supported_yet():
    assert "scheduler 'StepLR' (DeepSpeed takes it from torch.optim.lr_scheduler)" in \
        error_of({**BATCH, "scheduler": {"type": "StepLR"}})


def test_scheduler_name_is_case_sensitive_like_deepspeed_but_suggested():
    assert "unknown scheduler type 'warmuplr'; did you mean 'WarmupLR'?" in \
        error_of({**BATCH, "scheduler": {"type": "warmuplr"}})


def test_scheduler_params_are_checked():
    assert "unknown config key 'warmup_num_step' in 'scheduler.params'; did you mean 'warmup_num_steps'?" in \
        error_of({**BATCH, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}})
    assert "unknown config key 'total_num_steps' in 'scheduler.params'" in \
        error_of({**BATCH, "scheduler": {"type": "WarmupLR", "params": {"total_num_steps": 10}}})
    assert "scheduler 'WarmupCosineLR' needs scheduler.params.total_num_steps" in \
        error_of({**BATCH, "scheduler": {"type": "WarmupCosineLR"}})
    assert "warmup_type must be one of ['log', 'linear']" in \
        error_of({**BATCH, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}})
    assert "scheduler.params.warmup_num_steps must be an integer >= 1" in \
        error_of({**BATCH, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}})


# ---------------------------------------------------------------- sources: dict, path, existing config

def test_json_file_loads_from_str_and_path(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}))
    for source in (path, str(path)):
        cfg = DeepSpeedConfig.from_any(source, world_size=2)
        assert cfg.train_batch_size == 12
        assert cfg.raw == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    assert error_of(str(missing)) == f"config file not found: {missing}"


def test_invalid_json_reports_the_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": tru}\n}\n')
    message = error_of(path)
    assert str(path) in message and "is not valid JSON" in message and "line 3 column" in message


def test_duplicate_json_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    assert "repeats the key 'train_batch_size'" in error_of(path)


def test_non_object_json_and_wrong_config_type(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert "must hold a JSON object" in error_of(path)
    assert "config must be a dict, a path to a JSON file, or a DeepSpeedConfig" in error_of(42)


def test_existing_config_is_re_resolved_for_a_new_world_size():
    single = DeepSpeedConfig.from_any({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2})
    assert single.gradient_accumulation_steps == 8
    assert DeepSpeedConfig.from_any(single, world_size=4).gradient_accumulation_steps == 2


def test_raw_is_a_copy_of_the_users_dict():
    user = {"train_batch_size": 8, "fp16": {"enabled": False}}
    cfg = DeepSpeedConfig.from_any(user)
    user["fp16"]["enabled"] = True
    assert cfg.raw == {"train_batch_size": 8, "fp16": {"enabled": False}}



def test_zero_values_ds_lab_cannot_honour_are_errors_and_unenforced_keys_warn():
    assert "reduce_scatter: false is not supported" in error_of({**BATCH, "zero_optimization": {"stage": 2, "reduce_scatter": False}})
    assert "contiguous_gradients: false" in error_of({**BATCH, "zero_optimization": {"stage": 2, "contiguous_gradients": False}})
    with pytest.warns(UserWarning, match="stage3_max_live_parameters is accepted but not enforced"):
        parse(zero_optimization={"stage": 3, "stage3_max_live_parameters": 1e9})
    with pytest.warns(UserWarning, match="overlap_comm: false is honoured at stage 0 only"):
        parse(zero_optimization={"stage": 2, "overlap_comm": False})


# ---------------------------------------------------------------- nothing silently ignored

def test_a_client_optimizer_overrides_the_configs_optimizer_as_in_deepspeed_and_says_so():
    from ds_lab.config import check_client_optimizer

    class SGD:
        param_groups = []

    cfg = parse(optimizer={"type": "AdamW", "params": {}})
    with pytest.warns(UserWarning, match=r"initialize\(optimizer=<SGD>\) overrides the config's 'optimizer'"):
        check_client_optimizer(cfg, SGD())
    with pytest.warns(UserWarning, match="optimizer=<callable>"):
        check_client_optimizer(cfg, lambda params: SGD())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_client_optimizer(parse(), SGD())  # no 'optimizer' section: nothing overridden
        check_client_optimizer(cfg, None)  # no client optimizer: the config's is used


def test_a_client_scheduler_overrides_the_configs_scheduler_as_in_deepspeed_and_says_so():
    from ds_lab.config import check_client_scheduler

    class StepLR:
        def step(self):
            pass

    cfg = parse(optimizer={"type": "AdamW"}, scheduler={"type": "WarmupLR"})
    with pytest.warns(UserWarning, match=r"initialize\(lr_scheduler=<StepLR>\) overrides the config's 'scheduler'"):
        check_client_scheduler(cfg, StepLR())


def test_comms_logger_debug_is_applied_by_comm():
    """comms_logger.debug names each collective's caller (comm.configure_logger, tests/test_comm.py)."""
    import dataclasses
    import inspect

    from ds_lab import comm

    section = parse(comms_logger={"enabled": True, "debug": True}).comms_logger
    assert set(dataclasses.asdict(section)) == set(inspect.signature(comm.configure_logger).parameters)
