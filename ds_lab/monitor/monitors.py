"""Training monitors named by the config: `csv_monitor` and `tensorboard` (DeepSpeed's layout).

Each monitor receives, once per optimizer step on global rank 0, a list of
(name, value, global_samples) events such as ("Train/Samples/train_loss", 2.31, 512).
CSV: one file per event name, `{output_path}/{job_name}/{name with / -> _}.csv`, with the
header `step,<name>`, as DeepSpeed's csv monitor writes.
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


def build_monitors(config, rank: int) -> list:
    if rank != 0:
        return []
    monitors = []
    if config.csv_monitor.enabled:
        monitors.append(CSVMonitor(config.csv_monitor.output_path, config.csv_monitor.job_name))
    if config.tensorboard.enabled:
        monitors.append(TensorBoardMonitor(config.tensorboard.output_path, config.tensorboard.job_name))
    return monitors
