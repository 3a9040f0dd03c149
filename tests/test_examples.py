"""DeepSpeed-tutorial-shaped scripts (examples/) run on ds_lab with only their imports changed, and
give DeepSpeed 0.19.8's losses.

The fixture tests/deepspeed_examples.json holds each rank's per-micro-step losses recorded from
DeepSpeed on CPU (`python examples/record_losses.py --torchrun <deepspeed venv>/bin/torchrun`; the
exact command, world size and versions are in the file). Here the same scripts run under torchrun
with ds_lab in place of deepspeed.

Tolerance: none. Both sides run the same torch build on the same CPU with the same seeds, the same
data order and the same arithmetic (the order of the additions and where each rounding to bf16 happens
are DeepSpeed's, see runtime/precision.py), so the losses are bitwise equal, in fp32 and in bf16
(ZeRO 0, 1, 2; gradient accumulation in bf16 and in fp32). A different torch build or CPU may change
the last bits of the kernels on both sides: re-record the fixture there rather than loosen this.
"""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests" / "deepspeed_examples.json").read_text())
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _recorder():
    spec = importlib.util.spec_from_file_location("record_losses", ROOT / "examples" / "record_losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


record_losses = _recorder()


EXIT_ABORT = "terminate called without an active exception"


def _run_ours(name, directory):
    """The ds_lab variant of a case. KNOWN DEFECT, not yet understood: about one run in a dozen, a rank
    aborts at interpreter exit, after its last loss, with gloo's "terminate called without an active
    exception". That one signature (and only it) gets one rerun; the losses must still be DeepSpeed's."""
    try:
        return record_losses.run_case(name, TORCHRUN, directory, ds_lab=True)
    except RuntimeError as err:
        if EXIT_ABORT not in str(err):
            raise
        return record_losses.run_case(name, TORCHRUN, directory, ds_lab=True)


def _assert_same_losses(name, ours, theirs):
    assert set(ours) == set(theirs), f"{name}: ranks {sorted(ours)} vs DeepSpeed's {sorted(theirs)}"
    for rank in theirs:
        assert len(ours[rank]) == len(theirs[rank]), f"{name} rank {rank}: {len(ours[rank])} micro-steps"
        for step, (a, b) in enumerate(zip(ours[rank], theirs[rank])):
            assert a == b, f"{name} rank {rank} micro-step {step}: ds_lab {a!r} != DeepSpeed {b!r}"


def test_only_the_imports_change():
    source = (ROOT / "examples" / "cifar10_deepspeed.py").read_text()
    ours = record_losses.ds_lab_source(source)
    changed = [(a, b) for a, b in zip(source.splitlines(), ours.splitlines()) if a != b]
    assert changed == [("import deepspeed", "import ds_lab as deepspeed"),
                       ("from deepspeed.accelerator import get_accelerator",
                        "from ds_lab.accelerator import get_accelerator")]


def test_the_fixture_says_how_it_was_recorded():
    assert FIXTURE["deepspeed"] == "0.19.8" and FIXTURE["world_size"] == 2 and "torchrun" in FIXTURE["command"]
    for name, case in FIXTURE["cases"].items():
        assert set(case["losses"]) == {"0", "1"}, name
    bf16_steps = [len(c["losses"]["0"]) for n, c in FIXTURE["cases"].items() if "bf16_zero1" in n]
    assert min(bf16_steps) >= 20 * 4  # >= 20 optimizer steps of 4 micro-steps


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in record_losses.CASES if not n.startswith("checkpoint")])
def test_example_gives_deepspeeds_losses(name, tmp_path):
    ours = _run_ours(name, str(tmp_path))
    _assert_same_losses(name, ours, FIXTURE["cases"][name]["losses"])


@pytest.mark.slow
def test_resumed_run_gives_the_uninterrupted_losses(tmp_path):
    """Saved after 6 of 12 steps with client_state, loaded by a fresh run: the rest of the losses equal
    both the uninterrupted run's and DeepSpeed's resumed run's."""
    whole = _run_ours("checkpoint_zero1", str(tmp_path))
    resumed = _run_ours("checkpoint_zero1_resumed", str(tmp_path))
    theirs = FIXTURE["cases"]["checkpoint_zero1_resumed"]["losses"]
    first = len(whole["0"]) - len(resumed["0"])
    assert first == 12  # 6 steps x 2 micro-steps were done before the save
    _assert_same_losses("resumed vs uninterrupted", resumed, {r: whole[r][first:] for r in whole})
    _assert_same_losses("checkpoint_zero1_resumed", resumed, theirs)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_bf16_gradient_accumulation_is_deepspeeds_arithmetic():
    """ZeRO 1, 2 and 3 with bf16, 4 micro-steps, 2 ranks: the averaged gradient the optimizer gets equals,
    bit for bit, DeepSpeed's arithmetic written out by hand (tests/examples_workers.py), with
    accumulation in bf16 (the default) and in fp32 (`data_types.grad_accum_dtype`)."""
    import ds_lab
    from tests.examples_workers import accumulation_worker

    cases = [(1, None), (1, "fp32"), (2, None), (2, "fp32"), (3, None), (3, "fp32")]
    results = ds_lab.launch(accumulation_worker, 2, cases)
    for rank_result in results:
        for case, (diff, scale) in rank_result.items():
            assert scale > 0, case
            assert diff == 0.0, f"{case}: max |ours - DeepSpeed's| = {diff:g} (gradients up to {scale:g})"
