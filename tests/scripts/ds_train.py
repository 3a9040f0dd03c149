"""A DeepSpeed-style script for the launcher tests: run by `ds-lab run`, torchrun, or by hand.

    ds-lab run --num_procs 2 tests/scripts/ds_train.py --steps 4
Prints this rank's view of the launcher (environment, --local_rank) and, on rank 0, each step's loss.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from ds_lab import comm  # noqa: E402
from tests.runner_workers import train  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=-1)
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()
env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                                      "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")}
print("ENV " + json.dumps(dict(env, local_rank_arg=args.local_rank)), flush=True)
losses = train(args.steps)
if comm.get_rank() == 0:
    print("LOSSES " + json.dumps(losses), flush=True)
comm.destroy()
