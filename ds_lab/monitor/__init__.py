"""Monitoring: the per-rank memory ledger, training monitors, and the live dashboard.

`Dashboard`, `EventStore` and `plots` load on first use, so importing ds_lab.monitor never
imports matplotlib.
"""


def __getattr__(name):
    if name in ("Dashboard", "EventStore"):
        from ds_lab.monitor import dashboard
        return getattr(dashboard, name)
    if name == "plots":
        import importlib
        return importlib.import_module("ds_lab.monitor.plots")
    raise AttributeError(f"module 'ds_lab.monitor' has no attribute {name!r}")
