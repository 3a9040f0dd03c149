"""Tables the chapters print: model states per rank, measured beside the formula."""
from __future__ import annotations

STATES = ("params", "grads", "master_params", "optimizer_states")  # the paper's "model states"


def model_states(memory: dict) -> dict:
    """The four model-state categories of a memory report (the ledger), in the paper's order."""
    return {category: memory[category] for category in STATES}


def states_table(title: str, memory: dict, psi: int) -> str:
    """One rank's model states, each as bytes and as a multiple of Ψ; then the activations' peak."""
    lines = [f"{title}   (Ψ = {psi:,})"]
    for category in STATES:
        lines.append(f"  {category:<20}{memory[category]:>12,} bytes = {memory[category] / psi:4.1f} x Ψ")
    total = sum(memory[category] for category in STATES)
    lines.append(f"  {'model states':<20}{total:>12,} bytes = {total / psi:4.1f} x Ψ")
    if "activations_peak" in memory:
        lines.append(f"  {'activations (peak)':<20}{memory['activations_peak']:>12,} bytes")
    return "\n".join(lines)


def states_vs_formula_table(rows: dict, psi: int, title: str) -> str:
    """rows: {label: (measured states, formula states, note)}; two lines per label."""
    lines = [title, f"{'':<7}{'':<10}" + "".join(f"{c:>18}" for c in STATES) + f"{'total':>12}{'x Ψ':>7}"]
    for label, (measured, expected, note) in rows.items():
        for name, states, extra in (("measured", measured, ""), ("formula", expected, f"   {note}")):
            total = sum(states[c] for c in STATES)
            lines.append(f"{label if name == 'measured' else '':<7}{name:<10}"
                         + "".join(f"{states[c]:>18,}" for c in STATES) + f"{total:>12,}{total / psi:>7.2f}{extra}")
    return "\n".join(lines)
