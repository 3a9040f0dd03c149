"""`ds-lab run` (= `python -m ds_lab.runner`): DeepSpeed's `deepspeed` launcher, for any script.

    ds-lab run --num_procs 2 train.py --deepspeed_config ds.json     # 2 ranks on this machine
    ds-lab run --hostfile hosts --master_addr 10.0.0.1 train.py ...   # one torchrun per host, over ssh
    ds-lab run --hostfile hosts --no_ssh --node_rank 1 ...            # this host's share, started by hand

One machine: N processes of `python -u script.py --local_rank=i args...` (`--no_local_rank` drops the
argument), each with the environment DeepSpeed's launcher gives: RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, CROSS_RANK (this node's rank), CROSS_SIZE (nodes), LOCAL_SIZE, and
torchrun's LOCAL_WORLD_SIZE, which ds_lab.comm reads for the node layout. Each line a rank prints
comes out prefixed `[rank i]`; when one rank fails the others are stopped and the exit code is the
failed rank's. Every rank dies with the launcher, even if the launcher is killed with SIGKILL.

Several machines: a hostfile in DeepSpeed's format (`worker-1 slots=4`, `#` comments), filtered by
--include / --exclude (`worker-0@worker-1:0,2`) or --num_nodes / --num_gpus, becomes one `torchrun
--nnodes N --node_rank k --nproc-per-node S --master_addr A --master_port P` command per host:
torchrun's static rendezvous, no etcd. They are run over ssh (printed first; `--dry_run` prints
only), or, with --no_ssh, only this host's (--node_rank) here. Under torchrun a script gets
LOCAL_RANK in the environment only (no --local_rank argument): `ds_lab.initialize` reads it there.
Where DeepSpeed hands nodes to pdsh, MPI or Slurm, ds_lab hands them to torchrun.

Also here, for `ds_lab.launch` too: `die_with_parent` (a child never outlives its launcher) and
`gpu_count` (counts GPUs without initialising CUDA in the calling process).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

__all__ = ["main", "parse_args", "parse_hostfile", "filter_resources", "rank_environment", "local_commands",
           "node_commands", "die_with_parent", "gpu_count"]

DEFAULT_MASTER_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT
EXPORT_PREFIXES = ("NCCL", "PYTHON", "UCX", "MLFLOW", "MV2", "DS_LAB", "OMP_NUM_THREADS")  # sent to other nodes


# ---- process plumbing (also used by ds_lab.launch) --------------------------------------------

def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """Make this process die when its parent does, however the parent ends (kill -9 included).

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL), then a check that the parent did not die before the
    call. Elsewhere: a daemon thread that polls os.getppid() (it changes when the parent dies)."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    if _set_pdeathsig():
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent was gone before we asked
        return

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="ds_lab-parent-watchdog", daemon=True).start()


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def gpu_count() -> int:
    """GPUs this process could use, counted without initialising CUDA here (NVML, or a subprocess):
    a parent that initialised CUDA can no longer fork children that use it."""
    import torch
    if torch.cuda.is_initialized():
        return torch.cuda.device_count()
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return 0  # a CPU build of torch
    count = getattr(torch.cuda, "_device_count_nvml", lambda: -1)()
    return count if count >= 0 else _gpu_count_in_subprocess()


@functools.lru_cache(maxsize=1)
def _gpu_count_in_subprocess() -> int:
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return 0


# ---- arguments and resources ---------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds-lab run", description="Launch a training script on several processes "
                                "(DeepSpeed's `deepspeed` launcher).")
    p.add_argument("-H", "--hostfile", default=None, help="MPI-style hostfile ('worker-0 slots=4'); "
                   "default: this machine only")
    p.add_argument("-i", "--include", default="", help="NODE_SPEC[@NODE_SPEC ...], NODE_SPEC=NAME[:SLOT[,SLOT ...]]")
    p.add_argument("-e", "--exclude", default="", help="as --include, the resources NOT to use")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts of the hostfile")
    p.add_argument("--num_gpus", "--num_accelerators", "--num_procs", dest="num_gpus", type=int, default=-1,
                   help="processes per node (default: the GPUs here, or 1 without GPUs)")
    p.add_argument("--master_port", type=int, default=DEFAULT_MASTER_PORT)
    p.add_argument("--master_addr", default="", help="address of node 0 that every node can reach "
                   "(default: 127.0.0.1 on one machine; required with a hostfile of several hosts)")
    p.add_argument("--node_rank", type=int, default=-1, help="this node's rank (with --no_ssh)")
    p.add_argument("--module", action="store_true", help="run the script as `python -m module`")
    p.add_argument("--no_python", action="store_true", help="run the script directly, without `python`")
    p.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank=i to the script")
    p.add_argument("--no_ssh", action="store_true", help="start only this node's ranks (see --node_rank)")
    p.add_argument("--ssh_port", type=int, default=None)
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing (ds_lab's own)")
    p.add_argument("user_script", help="the training script, followed by its arguments")
    p.add_argument("user_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.no_python and args.module:
        p.error("--no_python and --module together: choose one")
    if (args.num_nodes > 0 or args.num_gpus > 0) and (args.include or args.exclude):
        p.error("--num_nodes/--num_gpus cannot be combined with --include/--exclude (as in DeepSpeed)")
    return args


def parse_hostfile(lines) -> "collections.OrderedDict[str, int]":
    """DeepSpeed's hostfile: `host slots=N` per line, `#` comments and blank lines skipped."""
    pool = collections.OrderedDict()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+)\s+slots=(\d+)", line)
        if not match:
            raise ValueError(f"hostfile has a bad entry {line!r}: write one host a line as 'worker-0 slots=4'")
        host, slots = match.group(1), int(match.group(2))
        if host in pool:
            raise ValueError(f"hostfile names {host} twice: give each host one line")
        pool[host] = slots
    if not pool:
        raise ValueError("hostfile is empty: write one host a line as 'worker-0 slots=4'")
    return pool


def _node_specs(text: str) -> dict:
    specs = collections.OrderedDict()
    for spec in text.split("@"):
        host, _, slots = spec.partition(":")
        specs.setdefault(host, []).extend(int(s) for s in slots.split(",") if s)
    return specs


def filter_resources(pool: dict, include: str = "", exclude: str = "", num_nodes: int = -1,
                     num_gpus: int = -1) -> "collections.OrderedDict[str, list]":
    """host -> slot ids to use, in hostfile order (DeepSpeed's parse_resource_filter + num_nodes/gpus)."""
    if include and exclude:
        raise ValueError("--include and --exclude are mutually exclusive: use one")
    active = collections.OrderedDict((host, list(range(n))) for host, n in pool.items())
    if include or exclude:
        chosen = {} if include else {h: list(s) for h, s in active.items()}
        for host, slots in _node_specs(include or exclude).items():
            if host not in active:
                raise ValueError(f"host {host!r} is not in the hostfile (it has {', '.join(active)})")
            for slot in slots:
                if slot not in active[host]:
                    raise ValueError(f"host {host!r} has no slot {slot} (slots 0..{len(active[host]) - 1})")
            if include:
                chosen[host] = sorted(set(chosen.get(host, []) + (slots or active[host])))
            else:
                chosen[host] = [s for s in chosen[host] if slots and s not in slots]
        active = collections.OrderedDict((h, chosen[h]) for h in active if chosen.get(h))
    if num_nodes > 0:
        active = collections.OrderedDict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        active = collections.OrderedDict((h, list(range(num_gpus))) for h in active)
    if not active:
        raise ValueError("no host and slot is left to run on after --include/--exclude")
    return active


# ---- the commands --------------------------------------------------------------------------

def _script_command(args, local_rank: Optional[int]) -> list:
    cmd = [] if args.no_python else [sys.executable, "-u"] + (["-m"] if args.module else [])
    cmd.append(args.user_script)
    if local_rank is not None and not args.no_local_rank:
        cmd.append(f"--local_rank={local_rank}")
    return cmd + list(args.user_args)


def rank_environment(rank: int, local_rank: int, world_size: int, local_size: int, node_rank: int, nnodes: int,
                     master_addr: str, master_port: int, base: Optional[dict] = None) -> dict:
    """The variables DeepSpeed's launcher sets for one rank (and torchrun's LOCAL_WORLD_SIZE)."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_SIZE=str(local_size),
               LOCAL_WORLD_SIZE=str(local_size), CROSS_RANK=str(node_rank), CROSS_SIZE=str(nnodes),
               MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    if local_size > 1 and "OMP_NUM_THREADS" not in env:  # as torchrun: ranks sharing a machine's cores
        env["OMP_NUM_THREADS"] = "1"
    return env


def local_commands(args, slots: list) -> list:
    """[(argv, env)] for the ranks of one machine (node 0 of 1)."""
    n = len(slots)
    addr = args.master_addr or "127.0.0.1"
    visible = _visible_devices(slots)
    out = []
    for local_rank in range(n):
        env = rank_environment(local_rank, local_rank, n, n, 0, 1, addr, args.master_port)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        out.append((_script_command(args, local_rank), env))
    return out


def _visible_devices(slots: list) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for these slots (counted within any CUDA_VISIBLE_DEVICES already set);
    None when they are all the GPUs there are, in order: nothing to narrow."""
    if slots == list(range(len(slots))):
        return None
    known = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ",".join(known[s] if s < len(known) else str(s) for s in slots)


def node_commands(args, active: dict) -> list:
    """[(host, torchrun argv, env)] for each node of a multi-node job (static rendezvous at master_addr);
    env: the node's CUDA_VISIBLE_DEVICES, its slots, as DeepSpeed sets it."""
    if not args.master_addr:
        raise ValueError("several hosts need --master_addr: the address of the first host, reachable from every "
                         "host (e.g. --master_addr 10.0.0.1)")
    nnodes, out = len(active), []
    for node_rank, (host, slots) in enumerate(active.items()):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
               f"--nproc-per-node={len(slots)}", f"--master_addr={args.master_addr}",
               f"--master_port={args.master_port}"]
        cmd += (["--no-python"] if args.no_python else ["-m"] if args.module else [])
        out.append((host, cmd + [args.user_script] + list(args.user_args),
                    {"CUDA_VISIBLE_DEVICES": ",".join(str(s) for s in slots)}))
    return out


def _ssh_command(args, host: str, cmd: list, env: dict) -> list:
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    remote = f"cd {shlex.quote(os.path.abspath('.'))} && " + (f"env {exports} " if exports else "") + shlex.join(cmd)
    return ["ssh"] + (["-p", str(args.ssh_port)] if args.ssh_port else []) + [host, remote]


def _exports() -> dict:
    """Variables sent to every node: NCCL_*, PYTHON*, ..., and `.deepspeed_env` files (KEY=VALUE lines)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(EXPORT_PREFIXES)}
    for folder in (os.path.expanduser("~"), "."):
        path = os.path.join(folder, os.environ.get("DS_ENV_FILE", ".deepspeed_env"))
        if os.path.isfile(path):
            with open(path) as f:
                env.update(line.strip().split("=", 1) for line in f if "=" in line)
    return env


# ---- running them --------------------------------------------------------------------------

def _pump(stream, sink, prefix: str, lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sink.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            sink.flush()
    stream.close()


def _start(cmd, env, prefix, lock, readers) -> subprocess.Popen:
    # its own process group (stopped as one), and SIGKILL when this launcher dies, however it dies
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True, preexec_fn=_set_pdeathsig)
    for stream, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
        readers.append(threading.Thread(target=_pump, args=(stream, sink, prefix, lock), daemon=True))
        readers[-1].start()
    return proc


def _stop(procs) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # the rank and whatever it started
                except (ProcessLookupError, PermissionError):
                    pass
        t_end = time.monotonic() + wait
        for p in procs:
            try:
                p.wait(timeout=max(0.0, t_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def run_processes(jobs) -> int:
    """Start [(label, argv, env)], stream their lines prefixed; the first failure stops the rest."""
    lock, procs, readers = threading.Lock(), [], []
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM,)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        procs = [(label, _start(cmd, env, f"[{label}]", lock, readers)) for label, cmd, env in jobs]
        while True:
            codes = [(label, p.poll()) for label, p in procs]
            failed = [(label, c) for label, c in codes if c not in (None, 0)]
            if failed:
                label, code = failed[0]
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                print(f"ds-lab run: {label} failed ({how}); stopping the others", file=sys.stderr, flush=True)
                return code if code > 0 else 128 - code
            if all(c == 0 for _, c in codes):
                return 0
            time.sleep(0.2)
    finally:
        _stop([p for _, p in procs])
        for reader in readers:  # the last lines, printed before we return
            reader.join(timeout=2)
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.hostfile:
            with open(args.hostfile) as f:
                pool = parse_hostfile(f)
        else:
            pool = collections.OrderedDict(localhost=max(1, gpu_count()) if args.num_gpus < 1 else args.num_gpus)
        active = filter_resources(pool, args.include, args.exclude, args.num_nodes, args.num_gpus)
        if len(active) == 1 and not args.no_ssh:
            local = local_commands(args, next(iter(active.values())))
            jobs = [(f"rank{r}", cmd, env) for r, (cmd, env) in enumerate(local)]
        else:
            nodes = node_commands(args, active)
            if args.no_ssh:
                if not 0 <= args.node_rank < len(nodes):
                    raise ValueError(f"--no_ssh starts one node's ranks: give --node_rank in 0..{len(nodes) - 1}")
                nodes = [nodes[args.node_rank]]
                jobs = [(host, cmd, {**os.environ, **env}) for host, cmd, env in nodes]
            else:
                jobs = [(host, _ssh_command(args, host, cmd, {**_exports(), **env}), dict(os.environ))
                        for host, cmd, env in nodes]
    except (ValueError, OSError) as err:
        print(f"ds-lab run: {err}", file=sys.stderr)
        return 2
    for label, cmd, _ in jobs:
        print(f"ds-lab run: {label}: {shlex.join(cmd)}", file=sys.stdout if args.dry_run else sys.stderr, flush=True)
    return 0 if args.dry_run else run_processes(jobs)


if __name__ == "__main__":
    sys.exit(main())
