"""zero.Init takes DeepSpeed's arguments and honours or refuses each one: none is silently ignored."""
import pytest
import torch

import ds_lab
from ds_lab.zero import Init


def test_an_unknown_keyword_is_a_type_error_as_in_deepspeed():
    with pytest.raises(TypeError, match="remote_devic"):
        Init(remote_devic="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"pin_memory": True}, "pin_memory"),
    ({"remote_device": "nvme"}, "remote_device='nvme'"),
    ({"zero_quantized_weights": True}, "ZeRO\\+\\+"),
    ({"zero_param_parallel_group": object()}, "hpZ"),
    ({"param_swapper": object()}, "NVMe"),
    ({"dtype": torch.int8}, "must be one of"),
])
def test_deepspeed_arguments_ds_lab_lacks_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Init(**kwargs)


def test_mem_efficient_linear_has_nothing_to_switch_and_says_so():
    with pytest.warns(UserWarning, match="mem_efficient_linear"):
        Init(mem_efficient_linear=True, enabled=False)


def _init_with_config_alias():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init = Init(config={"train_batch_size": 1, "bf16": {"enabled": True}}, enabled=False)
    return init.dtype, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_the_deprecated_aliases_are_accepted_with_a_warning_like_deepspeed():
    ((dtype, messages),) = ds_lab.launch(_init_with_config_alias, 1)  # a config needs the process group
    assert dtype == torch.bfloat16 and any("config_dict_or_path" in m for m in messages)
    with pytest.raises(ValueError, match="only data_parallel_group"):
        Init(data_parallel_group=object(), sequence_data_parallel_group=object())


def _build_under_init(kwargs):
    with Init(**kwargs):
        layer = torch.nn.Linear(3, 5)
    return layer.weight.dtype, layer._ds_init_shard.shard.dtype, layer._ds_init_shard.numel


@pytest.mark.parametrize("kwargs", [{"dtype": torch.bfloat16},
                                    {"config_dict_or_path": {"train_batch_size": 2, "bf16": {"enabled": True}}}])
def test_dtype_and_the_configs_precision_convert_the_parameters(kwargs):
    (result,) = ds_lab.launch(_build_under_init, 1, kwargs)
    assert result == (torch.bfloat16, torch.bfloat16, 3 * 5 + 5)


def test_without_dtype_or_config_the_modules_dtype_is_kept():
    (result,) = ds_lab.launch(_build_under_init, 1, {})
    assert result[:2] == (torch.float32, torch.float32)
