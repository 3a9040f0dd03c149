"""`ds-lab run` (ds_lab/runner.py): DeepSpeed's launcher. The rank environment, the hostfile and its
filters (values checked once against DeepSpeed 0.19.8's runner), the per-node torchrun commands, and
real runs: the same losses as ds_lab.launch, a failing rank stopping the others, two "nodes" on loopback."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

import ds_lab
from ds_lab import runner
from tests import runner_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("tests", "scripts", "ds_train.py")
HOSTS = ["# a comment", "worker-0 slots=4", "", "worker-1 slots=4", "worker-2 slots=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "ds_lab.cli", "run", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_env())


def _lines(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def launch_losses():
    return ds_lab.launch(runner_workers.train, 2, 3)[0]


def test_hostfile_and_filters_as_deepspeed():
    pool = runner.parse_hostfile(HOSTS)
    assert dict(pool) == {"worker-0": 4, "worker-1": 4, "worker-2": 2}
    f = runner.filter_resources
    assert dict(f(pool, include="worker-0@worker-1:0,2")) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 2]}
    assert dict(f(pool, exclude="worker-1:0")) == {"worker-0": [0, 1, 2, 3], "worker-1": [1, 2, 3], "worker-2": [0, 1]}
    assert dict(f(pool, exclude="worker-0")) == {"worker-1": [0, 1, 2, 3], "worker-2": [0, 1]}
    assert list(f(pool, include="worker-2:1@worker-0:3").items()) == [("worker-0", [3]), ("worker-2", [1])]
    assert dict(f(pool, num_nodes=2, num_gpus=2)) == {"worker-0": [0, 1], "worker-1": [0, 1]}
    with pytest.raises(ValueError, match="'worker-9' is not in the hostfile"):
        f(pool, include="worker-9")
    with pytest.raises(ValueError, match="no slot 5"):
        f(pool, include="worker-2:5")
    with pytest.raises(ValueError, match="mutually exclusive"):
        f(pool, include="worker-0", exclude="worker-1")
    with pytest.raises(ValueError, match="bad entry 'worker-3 4'.*slots=4"):
        runner.parse_hostfile(["worker-3 4"])
    with pytest.raises(ValueError, match="twice"):
        runner.parse_hostfile(["a slots=1", "a slots=2"])


def test_rank_environment_is_deepspeeds():
    env = runner.rank_environment(5, 1, 8, 4, 1, 2, "10.0.0.1", 29500, base={})
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                   "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                   "OMP_NUM_THREADS": "1"}


def test_several_hosts_become_one_torchrun_per_node(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("\n".join(HOSTS))
    proc = _cli("--hostfile", str(hostfile), "--exclude", "worker-1:0", "--master_addr", "10.0.0.1",
                "--master_port", "29611", "--ssh_port", "2222", "--dry_run", "train.py", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    lines = _lines(proc.stdout, "ds-lab run: ")
    assert len(lines) == 3
    for node_rank, (line, host, slots) in enumerate(zip(lines, ["worker-0", "worker-1", "worker-2"],
                                                        ["0,1,2,3", "1,2,3", "0,1"])):
        argv = shlex.split(line.split(": ", 2)[2])
        assert argv[:4] == ["ssh", "-p", "2222", host]
        remote = shlex.split(argv[4])
        assert remote[:2] == ["cd", ROOT] and f"CUDA_VISIBLE_DEVICES={slots}" in remote
        run = remote[remote.index(sys.executable):]
        assert run == [sys.executable, "-m", "torch.distributed.run", "--nnodes=3", f"--node_rank={node_rank}",
                       f"--nproc-per-node={len(slots.split(','))}", "--master_addr=10.0.0.1",
                       "--master_port=29611", "train.py", "--epochs", "3"]
    # several hosts need an address every host can reach
    proc = _cli("--hostfile", str(hostfile), "--dry_run", "train.py")
    assert proc.returncode == 2 and "--master_addr" in proc.stderr


def test_ds_lab_run_trains_as_launch_does(launch_losses):
    proc = _cli("--num_procs", "2", "--master_port", str(_port()), SCRIPT, "--steps", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    envs = [json.loads(line.split("ENV ", 1)[1]) for line in _lines(proc.stdout, "[rank")
            if "ENV " in line]
    assert sorted((e["RANK"], e["LOCAL_RANK"], e["local_rank_arg"]) for e in envs) == [("0", "0", 0), ("1", "1", 1)]
    assert {(e["WORLD_SIZE"], e["LOCAL_SIZE"], e["CROSS_RANK"], e["CROSS_SIZE"], e["MASTER_ADDR"]) for e in envs} \
        == {("2", "2", "0", "1", "127.0.0.1")}
    (line,) = _lines(proc.stdout, "[rank0] LOSSES ")
    assert json.loads(line.split("LOSSES ", 1)[1]) == pytest.approx(launch_losses, rel=1e-6)


def test_no_local_rank_and_module_forms():
    args = runner.parse_args(["--no_local_rank", "--module", "pkg.train", "--lr", "1"])
    (cmd, env), = runner.local_commands(args, [0])
    assert cmd == [sys.executable, "-u", "-m", "pkg.train", "--lr", "1"]
    args = runner.parse_args(["--num_gpus", "2", "train.py"])
    assert [c for c, _ in runner.local_commands(args, [0, 1])][1] == [sys.executable, "-u", "train.py", "--local_rank=1"]


def test_include_narrows_the_visible_gpus(monkeypatch):
    args = runner.parse_args(["--include", "localhost:1,3", "train.py"])
    active = runner.filter_resources({"localhost": 4}, args.include)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    envs = [env for _, env in runner.local_commands(args, active["localhost"])]
    assert [(e["CUDA_VISIBLE_DEVICES"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("1,3", "0", "2"),
                                                                                          ("1,3", "1", "2")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # slots count within what is visible already
    assert runner.local_commands(args, [1, 3])[0][1]["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert runner.local_commands(args, [0, 1])[0][1]["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"  # the first ones: untouched


def test_a_failing_rank_stops_the_others_and_sets_the_exit_code(tmp_path):
    pid_file = tmp_path / "rank0.pid"
    t0 = time.monotonic()
    proc = _cli("--num_procs", "2", "--master_port", str(_port()), os.path.join("tests", "scripts", "fail_rank.py"),
                str(pid_file), timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 30
    assert "[rank1] rank 1 gives up" in proc.stderr and "rank1 failed (exit code 3)" in proc.stderr
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_two_nodes_on_loopback_without_ssh_train_as_launch_does(tmp_path, launch_losses):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, procs = _port(), []
    try:
        for node_rank in (0, 1):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ds_lab.runner", "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
                 str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port), SCRIPT, "--steps", "3"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(),
                start_new_session=True))
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outs
    (line,) = [x for x in outs[0][0].splitlines() if "LOSSES " in x]
    assert json.loads(line.split("LOSSES ", 1)[1]) == pytest.approx(launch_losses, rel=1e-6)
    envs = [json.loads(x.split("ENV ", 1)[1]) for out, _ in outs for x in out.splitlines() if "ENV " in x]
    assert sorted((e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs) == [("0", "0", "2"), ("1", "0", "2")]
