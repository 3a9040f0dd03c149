"""Scale-out: the same DeepSpeed-style script under torchrun as 2 nodes x 2 ranks on loopback (torchrun's
static rendezvous: --nnodes 2 --node_rank k --master_addr --master_port, no etcd) and as 1 node x 4
gives the same losses; each rank sees the node layout torchrun gives it."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("tests", "scripts", "ds_train.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nnodes: int, per_node: int, steps: int = 3) -> tuple:
    """Start one torchrun per node together; return (rank 0's losses, every rank's environment)."""
    port, procs = _port(), []
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    try:
        for node_rank in range(nnodes):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank",
                 str(node_rank), "--nproc-per-node", str(per_node), "--master_addr", "127.0.0.1",
                 "--master_port", str(port), SCRIPT, "--steps", str(steps)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                start_new_session=True))
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:  # its process group holds torchrun's ranks too
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0] * nnodes, "\n".join(  # each node's exit code and the end of its stderr
        f"--- node {node}: exit code {code}\n{err[-4000:]}" for node, (code, (_, err)) in enumerate(zip(codes, outs)))
    text = "".join(out for out, _ in outs)
    losses = [json.loads(line.split("LOSSES ", 1)[1]) for line in text.splitlines() if line.startswith("LOSSES ")]
    envs = [json.loads(line.split("ENV ", 1)[1]) for line in text.splitlines() if line.startswith("ENV ")]
    assert len(losses) == 1 and len(envs) == nnodes * per_node
    return losses[0], envs


@pytest.mark.slow
def test_two_nodes_of_two_train_as_one_node_of_four():
    losses_2x2, envs_2x2 = _torchrun(2, 2)
    losses_1x4, envs_1x4 = _torchrun(1, 4)
    assert len(losses_2x2) == 3 and losses_2x2 == pytest.approx(losses_1x4, rel=1e-6, abs=1e-7)
    assert sorted((e["RANK"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["WORLD_SIZE"]) for e in envs_2x2) == [
        ("0", "0", "2", "4"), ("1", "1", "2", "4"), ("2", "0", "2", "4"), ("3", "1", "2", "4")]
    assert sorted((e["RANK"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs_1x4) == [
        (str(r), str(r), "4") for r in range(4)]
