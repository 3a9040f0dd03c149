"""Training monitors named by the config: `csv_monitor`, `tensorboard` and `wandb` (DeepSpeed's layout).

Each monitor receives, once per optimizer step on global rank 0, a list of
(name, value, global_samples) events such as ("Train/Samples/train_loss", 2.31, 512).
CSV: one file per event name, `{output_path}/{job_name}/{name with / -> _}.csv`, with the
header `step,<name>`, as DeepSpeed's csv monitor writes.
wandb: `wandb: {enabled, group, team, project}`; the wandb package is imported only when enabled
(absent: a ConfigError saying `pip install wandb`), `wandb.init(project, group, entity=team)` runs on
rank 0 in the mode WANDB_MODE says, "offline" unless set (DeepSpeed leaves wandb's own default,
online), and each event is `wandb.log({name: value}, step=global_samples)`, as DeepSpeed logs it.
"""
from __future__ import annotations

import csv
import os


class CSVMonitor:
    def __init__(self, output_path: str, job_name: str):
        self.dir = os.path.join(output_path or "csv_monitor", job_name)
        os.makedirs(self.dir, exist_ok=True)

    def write(self, events) -> None:
        for name, value, step in events:
            path = os.path.join(self.dir, name.replace("/", "_") + ".csv")
            new = not os.path.exists(path)
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", name])
                writer.writerow([step, value])


class TensorBoardMonitor:
    def __init__(self, output_path: str, job_name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # the tensorboard package is optional
            from ds_lab.config import ConfigError
            raise ConfigError("'tensorboard.enabled' needs the tensorboard package: "
                              "pip install tensorboard (or disable the section)") from err
        self.writer = SummaryWriter(log_dir=os.path.join(output_path or "runs", job_name))

    def write(self, events) -> None:
        for name, value, step in events:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()


class WandbMonitor:
    def __init__(self, project: str = "deepspeed", group=None, team=None):
        try:
            import wandb
        except ImportError as err:  # the wandb package is optional
            from ds_lab.config import ConfigError
            raise ConfigError("'wandb.enabled' needs the wandb package: pip install wandb "
                              "(or disable the section)") from err
        self.wandb = wandb
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), project=project, group=group,
                              entity=team)

    def write(self, events) -> None:
        for name, value, step in events:
            self.wandb.log({name: value}, step=step)


def build_monitors(config, rank: int) -> list:
    if rank != 0:
        return []
    monitors = []
    if config.csv_monitor.enabled:
        monitors.append(CSVMonitor(config.csv_monitor.output_path, config.csv_monitor.job_name))
    if config.tensorboard.enabled:
        monitors.append(TensorBoardMonitor(config.tensorboard.output_path, config.tensorboard.job_name))
    wandb = getattr(config, "wandb", None)  # the config's wandb section (absent in configs built by hand)
    if wandb is not None and wandb.enabled:
        monitors.append(WandbMonitor(project=wandb.project, group=wandb.group, team=wandb.team))
    return monitors
