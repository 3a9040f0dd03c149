"""How often the live dashboard redraws in a real Jupyter kernel while ranks train.

    python benchmarks/dashboard_rate.py [--world-size 2] [--steps 60]

Starts a kernel (nbclient), runs `ds_lab.launch(train_worker, ...)` there with a live `Dashboard`,
and prints the redraws per second over the window in which events arrived, and the seconds one
redraw took (figure + PNG + display). The issue's target is at least 2 redraws a second.
"""
from __future__ import annotations

import argparse
import textwrap

import nbformat
from nbclient import NotebookClient


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(f"""
        import time, ds_lab
        from ds_lab.monitor import Dashboard
        from ds_lab.train import train_worker
        dash = Dashboard(live=True)
        ds_lab.launch(train_worker, {args.world_size}, steps={args.steps}, progress=False, dashboard=dash)
        window = max(s["end"] for spans in dash.store.spans.values() for s in spans) - dash.store.t0
        print(f"RESULT {{dash.redraws}} redraws, events over {{window:.1f}} s: "
              f"{{(dash.redraws - 1) / window:.2f}} live redraws per second; one redraw {{dash._draw_seconds:.3f}} s")
    """))]
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    for out in nb.cells[0].outputs:
        for line in out.get("text", "").splitlines():
            if line.startswith("RESULT"):
                print(f"{args.world_size} ranks, {args.steps} steps: {line[7:]}")


if __name__ == "__main__":
    main()
