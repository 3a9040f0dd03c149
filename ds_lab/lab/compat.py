"""Which DeepSpeed config keys ds_lab runs, and why it refuses the others: a table built from the schema.

    rows = compatibility_rows()            # one Row per key: section, key, status, note
    print(compatibility_markdown(rows))    # what scripts/config_compat.py writes to docs/config_compatibility.md
    check_rows(rows)                       # every row's status, confirmed by parsing a config with that key

Nothing here is typed by hand twice. The supported keys are the fields of the config dataclasses
(`ds_lab.config.DeepSpeedConfig` and its sections) and of their checker tables; the refused ones are the
`_DEEPSPEED_*_KEYS` dicts with which the config already refuses DeepSpeed keys, and their reasons are
those dicts' hints. The only knowledge of its own this file holds is which keys DeepSpeed lacks
(`DS_LAB_ONLY`) and which supported keys take some values only (`VALUE_LIMITS`); `check_rows` confirms
both by parsing, so a change in ds_lab.config that this table misses fails the test.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, fields

from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.config import optimizer as optimizer_config
from ds_lab.config import sections

SUPPORTED, PARTIAL, REFUSED, OWN = "supported", "accepted, not enforced", "refused", "ds_lab only"
NOT_YET = "not built in ds_lab yet"
_BATCH = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

# keys DeepSpeed does not have: ds_lab's own additions (see ds_lab.config's docstring)
DS_LAB_ONLY = {
    ("", "hierarchical_allreduce"): "stage-0 all-reduce intra-node, inter-node, intra-node (comm/hierarchical.py)",
    ("", "fused_kernels"): "false: every op runs its torch reference; null/true: CUDA kernels where they can run",
    ("pipeline", "schedule"): "'1f1b' (DeepSpeed's TrainSchedule), 'afab' (GPipe) or 'interleaved'",
    ("pipeline", "virtual_stages"): "model chunks per stage for the interleaved schedule",
    ("optimizer.type", "SignAdam"): "sign-compressed Adam (optim/sign.py)",
    ("optimizer.type", "SignSGD"): "signSGD with majority vote (optim/sign.py)",
}
# supported keys that refuse some values: (section, key) -> (a refused value, why)
VALUE_LIMITS = {
    ("zero_optimization", "contiguous_gradients"): (False, "false refused: ZeRO keeps flat contiguous gradients"),
    ("zero_optimization", "reduce_scatter"): (False, "false refused: ZeRO always reduce-scatters gradients"),
    ("tensor_parallel", "tp_overlap_comm"): (True, "true refused: the tensor-parallel all-reduces are synchronous"),
    ("zero_optimization", "offload_optimizer"): ({"device": "nvme"}, "device 'cpu' (stages 1-3); 'nvme' refused"),
    ("zero_optimization", "offload_param"): ({"device": "nvme"}, "device 'cpu' at stage 3; 'nvme' refused"),
    ("fp16", "fp16_master_weights_and_grads"): (True, "needs ZeRO + offload_optimizer cpu, as DeepSpeed; "
                                                      "the masters stay fp32 here (a warning says so)"),
    ("data_types", "grad_accum_dtype"): ("int8", "fp32/fp16/bf16; without ZeRO it must be the model's dtype"),
}
# the sections built from a dataclass: name -> (its DeepSpeed-only keys, a minimal valid value)
_SECTIONS = {
    "fp16": sections._DEEPSPEED_FP16_KEYS, "bf16": sections._DEEPSPEED_BF16_KEYS,
    "zero_optimization": sections._DEEPSPEED_ZERO_KEYS, "comms_logger": {}, "csv_monitor": {}, "tensorboard": {},
    "pipeline": sections._DEEPSPEED_PIPELINE_KEYS, "tensor_parallel": sections._DEEPSPEED_TENSOR_PARALLEL_KEYS,
    "data_types": {}, "wandb": {}, "flops_profiler": {}, "activation_checkpointing": {},
}
_TOP_LEVEL_NOTES = {
    "train_batch_size": "= micro x accumulation x data-parallel size; give any two",
    "optimizer": "see the optimizer.type and optimizer.params sections",
    "scheduler": "see the scheduler.type section",
    "hierarchical_allreduce": DS_LAB_ONLY[("", "hierarchical_allreduce")],
    "prescale_gradients": "stage 0: x 1/N before the all-reduce; ZeRO-2/3 refuse it and ZeRO-1 ignores it "
                          "(warned), as DeepSpeed",
    "gradient_predivide_factor": "stage 0: x 1/f before the all-reduce, x f/N after; ZeRO-2/3 refuse != 1 "
                                 "and ZeRO-1 ignores it (warned), as DeepSpeed",
    "communication_data_type": "the gradient reduction's dtype at every stage (cast, reduce, cast back); "
                               "default: the training precision",
    "zero_allow_untested_optimizer": "ZeRO with an optimizer outside DeepSpeed's tested list: DeepSpeed "
                                     "asserts, ds_lab warns and runs it",
}


@dataclass(frozen=True)
class Row:
    section: str  # "" for the top level, "zero_optimization", "optimizer.type", ...
    key: str
    status: str  # SUPPORTED, PARTIAL, REFUSED or OWN
    note: str = ""


def _status(section: str, key: str, supported: bool, refusals: dict) -> tuple[str, str]:
    if (section, key) in DS_LAB_ONLY:
        return OWN, DS_LAB_ONLY[(section, key)]
    if supported:
        if section == "zero_optimization" and key in sections._ZERO_NOT_ENFORCED:
            return PARTIAL, sections._ZERO_NOT_ENFORCED[key]
        return SUPPORTED, VALUE_LIMITS.get((section, key), (None, ""))[1]
    return REFUSED, refusals[key] or NOT_YET


def compatibility_rows() -> list[Row]:
    """Every key ds_lab knows, supported or refused, section by section, each sorted by status then name."""
    rows = []

    def add(section, supported_keys, refusals, notes=None):
        block = [Row(section, key, *_status(section, key, True, refusals)) for key in supported_keys]
        block += [Row(section, key, *_status(section, key, False, refusals)) for key in refusals]
        order = {SUPPORTED: 0, PARTIAL: 1, OWN: 2, REFUSED: 3}
        block = [dataclasses.replace(r, note=(notes or {}).get(r.key, r.note)) for r in block]
        rows.extend(sorted(block, key=lambda r: (order[r.status], r.key.lower())))

    top = [f.name for f in fields(DeepSpeedConfig) if f.name != "raw"]
    add("", top, sections._DEEPSPEED_TOP_LEVEL_KEYS, _TOP_LEVEL_NOTES)
    for name, refusals in _SECTIONS.items():
        cls = next(f for f in fields(DeepSpeedConfig) if f.name == name).default_factory
        add(name, [f.name for f in fields(cls)], refusals)
    add("optimizer", ["type", "params"], optimizer_config._DEEPSPEED_OPTIMIZER_KEYS)
    add("optimizer.type", optimizer_config.SUPPORTED_OPTIMIZERS,
        {name: NOT_YET for name in optimizer_config._DEEPSPEED_OPTIMIZERS})
    add("optimizer.params (Adam, AdamW)", optimizer_config._ADAM_PARAM_CHECKERS,
        optimizer_config._DEEPSPEED_ADAM_PARAMS)
    add("scheduler.type", optimizer_config.SCHEDULES,
        {name: NOT_YET for name in optimizer_config._DEEPSPEED_SCHEDULERS})
    return rows


def counts(rows) -> dict:
    """{status: number of rows}, in the order SUPPORTED, PARTIAL, OWN, REFUSED."""
    return {status: sum(r.status == status for r in rows) for status in (SUPPORTED, PARTIAL, OWN, REFUSED)}


def compatibility_markdown(rows=None) -> str:
    """The whole table as Markdown: a summary, then one table per section."""
    rows = compatibility_rows() if rows is None else rows
    total = counts(rows)
    lines = ["# DeepSpeed config keys in ds_lab", "",
             "Generated by `scripts/config_compat.py` from ds_lab's config schema (`ds_lab/config/`) and the",
             "DeepSpeed keys it refuses, with the reasons the config gives. Do not edit by hand: run",
             "`python scripts/config_compat.py`; `tests/test_compat.py` checks this file is up to date and that",
             "every row is what parsing a config with that key does.", "",
             "Statuses: **supported** (parsed and acted on; a note names values it refuses), **accepted, not",
             "enforced** (parsed, with a warning that says what ds_lab does instead), **ds_lab only** (no such",
             "key in DeepSpeed), **refused** (a DeepSpeed key ds_lab does not build: a `ConfigError` that names",
             "it, never silently ignored).", "",
             "| status | keys |", "|---|---|"]
    lines += [f"| {status} | {n} |" for status, n in total.items()]
    for section in dict.fromkeys(r.section for r in rows):
        lines += ["", f"## {section or 'top level'}", "", "| key | ds_lab | note |", "|---|---|---|"]
        lines += [f"| `{r.key}` | {r.status} | {r.note.replace('|', '/')} |" for r in rows if r.section == section]
    return "\n".join(lines) + "\n"


def _config_with(row: Row, value):
    """A minimal config dict that sets `row`'s key to `value`."""
    config = {"train_batch_size": 2}
    if row.section == "":
        config[row.key] = value
    elif row.section == "optimizer":
        config["optimizer"] = {"type": "AdamW", row.key: value}
    elif row.section == "optimizer.type":
        config["optimizer"] = {"type": row.key}
    elif row.section.startswith("optimizer.params"):
        config["optimizer"] = {"type": "Adam", "params": {row.key: value}}
    elif row.section == "scheduler.type":
        required = optimizer_config.SCHEDULES.get(row.key, ((), ()))[0]
        config["scheduler"] = {"type": row.key, "params": {argument: 10 for argument in required}}
    else:
        config[row.section] = {row.key: value}
    return config


def _default(row: Row):
    """A value the schema accepts for a supported key: the dataclass default, or the empty section."""
    if row.key in _BATCH:
        return 2
    if (row.section, row.key) == ("pipeline", "virtual_stages"):
        return 2  # its default, None, means "the PipelineModule's", and a config cannot write None
    if row.section == "":
        f = next(f for f in fields(DeepSpeedConfig) if f.name == row.key)
        if f.name in ("optimizer", "scheduler"):
            return {"type": "AdamW"} if f.name == "optimizer" else {"type": "WarmupLR"}
        return {} if f.default is dataclasses.MISSING else f.default
    if row.section.endswith(".type"):
        return None  # the type is the key itself
    if row.section == "optimizer":
        return {} if row.key == "params" else "AdamW"
    if row.section.startswith("optimizer.params"):
        return {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "adam_w_mode": True,
                "torch_adam": False, "bias_correction": True}[row.key]
    cls = next(f for f in fields(DeepSpeedConfig) if f.name == row.section).default_factory
    return getattr(cls(), row.key)


def check_rows(rows=None) -> list[str]:
    """Parse a config per row and return the rows whose status (or value limit) parsing contradicts."""
    rows = compatibility_rows() if rows is None else rows
    wrong = []
    for row in rows:
        value = None if row.status == REFUSED else _default(row)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                DeepSpeedConfig.from_any(_config_with(row, value), world_size=1)
                error = None
            except ConfigError as err:
                error = str(err)
        said = error is not None and ("not support" in error or "not implemented" in error)
        warned = any(row.key in str(w.message) for w in caught)
        if row.status == REFUSED and not said:
            wrong.append(f"{row.section}.{row.key}: listed refused, parsing says {error or 'ok'}")
        elif row.status != REFUSED and error is not None:
            wrong.append(f"{row.section}.{row.key}: listed {row.status}, parsing says {error}")
        elif row.status == PARTIAL and not warned:
            wrong.append(f"{row.section}.{row.key}: listed {PARTIAL}, but no warning names it")
        limit = VALUE_LIMITS.get((row.section, row.key))
        if limit is not None:
            try:
                DeepSpeedConfig.from_any(_config_with(row, limit[0]), world_size=1)
                wrong.append(f"{row.section}.{row.key}: {limit[0]!r} is listed refused but parses")
            except ConfigError:
                pass
    return wrong
