"""Hierarchical all-reduce on simulated nodes: same sums as the flat one, other links, 1/k across nodes.

World 4 as 2 nodes of 2 (`launch(..., ranks_per_node=2)`): intra-node reduce-scatter, inter-node
all-reduce of half the message, intra-node all-gather. World 4 on one node: the flat all-reduce.
"""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import ds_lab
from ds_lab.comm import links, nodes
from ds_lab.config import ConfigError, DeepSpeedConfig
from tests import hierarchical_workers as hw
from tests import workers

SIZES = (1, 7, 8, 1001)  # 1, 7, 1001: not divisible by k = 2 (padded)


@pytest.fixture(scope="module")
def two_nodes():
    return ds_lab.launch(hw.allreduce_worker, 4, SIZES, ranks_per_node=2)


def test_children_see_torchrun_node_variables(two_nodes):
    for rank, r in enumerate(two_nodes):
        assert r["env"] == dict(LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2", GROUP_RANK=str(rank // 2),
                                NODE_RANK=str(rank // 2))
        assert r["node"] == rank // 2 and not r["flat_fallback"]


def test_hierarchical_equals_flat_all_reduce_for_sizes_not_divisible_by_k(two_nodes):
    for r in two_nodes:
        for n in SIZES:
            case = r["cases"][n]
            assert case["ints_equal"], n
            assert case["floats_diff"] < 1e-5, n
            assert case["world_fn"] == [6.0] * min(n, 3)  # hierarchical_all_reduce: 0 + 1 + 2 + 3


def test_every_record_names_its_link(two_nodes):
    for n in SIZES:
        padded = -(-n // 2) * 2 * 4
        assert two_nodes[0]["cases"][n]["flat_log"] == [("all_reduce", 4 * n, 4, "inter", 4 * n * 1.5, "")]
        assert two_nodes[0]["cases"][n]["hier_log"] == [
            ("reduce_scatter", padded, 2, "intra", padded / 2, "case"),
            ("all_reduce", padded // 2, 2, "inter", padded / 2, "case"),
            ("all_gather", padded, 2, "intra", padded / 2, "case")]
    rows = two_nodes[0]["inter_rows"]  # summarize(links=("inter",)): the rails' all-reduces only
    assert {row[0] for row in rows} == {"all_reduce"} and sum(row[2] for row in rows) == len(SIZES)


def test_measured_inter_node_bytes_equal_the_analytic_accounting(two_nodes):
    """Per rank (the busiest NIC): flat 2(N-1)/N S, hierarchical 2(m-1)/m S/k; whole job: only the
    flat ring's boundary ranks (local rank k-1) send across, every hierarchical rail does."""
    for n in SIZES:
        expected = links.cross_node_bytes(n, world_size=4, ranks_per_node=2)
        flat = [links_wire(r["cases"][n]["flat_log"]) for r in two_nodes]
        hier = [links_wire(r["cases"][n]["hier_log"]) for r in two_nodes]
        assert max(flat) == expected["flat"]["per_rank"] == 4 * n * 1.5
        assert sum(b for rank, b in enumerate(flat) if rank % 2 == 1) == expected["flat"]["total"]
        assert max(hier) == min(hier) == expected["hierarchical"]["per_rank"]
        assert sum(hier) == expected["hierarchical"]["total"]
        assert two_nodes[0]["cases"][n]["hier_log"][1][1] == expected["hierarchical"]["message"]
    big = links.cross_node_bytes(1000, 4, 2)  # m = 2, k = 2: message 1/2, busiest NIC 1/3, whole job 2/3
    assert big["hierarchical"]["message"] / big["flat"]["message"] == 1 / 2
    assert big["hierarchical"]["per_rank"] / big["flat"]["per_rank"] == pytest.approx(1 / 3)
    assert big["hierarchical"]["total"] / big["flat"]["total"] == pytest.approx(2 / 3)
    many = links.cross_node_bytes(8 * 2**20, 256, 8)  # m = 32: busiest NIC -> 1/k, whole job -> 1
    assert many["hierarchical"]["per_rank"] / many["flat"]["per_rank"] == pytest.approx(31 / 255)
    assert many["hierarchical"]["total"] / many["flat"]["total"] == pytest.approx(8 * 31 / 255)


def links_wire(log):
    return sum(wire for op, nbytes, size, link, wire, tag in log if link == "inter")


def test_sub_groups_are_built_on_every_rank_and_fall_back_with_one_rank_per_node(two_nodes):
    for rank, r in enumerate(two_nodes):
        assert r["sub"] == dict(flat=True, ranks=[rank % 2, rank % 2 + 2], value=float(2 * (rank % 2) + 4),
                                uses_given_group=True)


def test_one_node_of_four_falls_back_to_the_flat_all_reduce():
    for r in ds_lab.launch(hw.allreduce_worker, 4, (7,), ranks_per_node=4):
        case = r["cases"][7]
        assert r["flat_fallback"] and case["ints_equal"] and case["floats_diff"] == 0.0
        assert case["hier_log"] == [("all_reduce", 28, 4, "", 42.0, "case")] and r["inter_rows"] == []


def test_launch_refuses_nodes_that_do_not_divide_the_world():
    with pytest.raises(ValueError, match="ranks_per_node=3 must be a positive int that divides world_size=4"):
        ds_lab.launch(hw.env_worker, 4, ranks_per_node=3)


def test_nodes_follow_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert nodes.ranks_per_node() == 8 and nodes.node_of(15) == 1 and nodes.node_of(16) == 2
    assert nodes.nodes_of([9, 0, 8]) == {0: [0], 1: [8, 9]}
    assert nodes.link_of([0, 7], 16) == "intra" and nodes.link_of([7, 8], 16) == "inter"
    assert nodes.link_of([7, 8], 8) == ""  # the whole job is one node
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert nodes.ranks_per_node() == 4 and nodes.link_of([0, 3], 4) == ""


def test_in_place_launch_refuses_a_ranks_per_node_torchrun_contradicts(monkeypatch):
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "1"), monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=1"):
        ds_lab.launch(hw.env_worker, 1, ranks_per_node=2)


def test_torchrun_style_ranks_keep_their_environment_and_see_two_nodes():
    """Two processes set up as torchrun sets two nodes of one rank each; launch runs in place."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent("""
        import ds_lab
        from tests import hierarchical_workers as hw
        print(repr(ds_lab.launch(hw.env_worker, 2)[0]))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                   "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for r, out in enumerate(outs):
        assert eval(out.strip().splitlines()[-1]) == dict(rank=r, local_rank="0", per_node=1, node=r,
                                                          link="inter", value=2.0)


def test_config_key_is_checked_and_refused_with_zero():
    assert DeepSpeedConfig.from_any({"train_batch_size": 4}).hierarchical_allreduce is False
    assert DeepSpeedConfig.from_any({"train_batch_size": 4, "hierarchical_allreduce": True}).hierarchical_allreduce
    with pytest.raises(ConfigError, match="hierarchical_allreduce"):
        DeepSpeedConfig.from_any({"train_batch_size": 4, "hierarchical_allreduce": "yes"})
    with pytest.raises(ConfigError, match="zero_optimization.stage is 2"):
        DeepSpeedConfig.from_any({"train_batch_size": 4, "hierarchical_allreduce": True,
                                  "zero_optimization": {"stage": 2}})


@pytest.mark.parametrize("optimizer", [{"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
                                       {"type": "Adam", "params": {"lr": 1e-3}}], ids=["sgd_momentum", "adam"])
def test_engine_with_hierarchical_allreduce_trains_like_the_flat_one(optimizer):
    batches = workers.make_batches(3, 8, workers.TINY["block_size"])
    config = {"train_batch_size": 8, "optimizer": optimizer,
              "zero_optimization": {"stage": 0, "reduce_bucket_size": 20_000}}  # several buckets, odd sizes
    results = ds_lab.launch(hw.engine_worker, 4, config, batches, ranks_per_node=2)
    for r in results:
        off, on = r[False], r[True]
        assert on["losses"] == pytest.approx(off["losses"], rel=1e-5)
        for name, weight in off["weights"].items():
            torch.testing.assert_close(on["weights"][name], weight, rtol=1e-5, atol=1e-6)
        assert {link for _, _, link in off["records"]} == {"inter"}
        assert {(op, link) for op, _, link in on["records"]} == {("reduce_scatter", "intra"),
                                                                 ("all_reduce", "inter"), ("all_gather", "intra")}
        # per rank over the network: the flat ring's 2(N-1)/N = 1.5 x the gradient, the rails' 1/2 x half
        psi = 4 * off["num_parameters"] * len(off["losses"])
        assert off["inter_wire_bytes"] == 1.5 * psi
        assert on["inter_wire_bytes"] == pytest.approx(0.5 * psi, abs=4 * 3 * 8)  # padding: < 1 element per bucket
