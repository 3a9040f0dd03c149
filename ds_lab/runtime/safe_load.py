"""Reading a checkpoint file without running its code: `torch.load(weights_only=True)` and an allow-list.

A pickle can name any importable callable and call it while loading, so a checkpoint from an
untrusted place could run code. `weights_only=True` makes torch's unpickler refuse every global it
does not know (it knows tensors, storages, dtypes, OrderedDict, plain containers). What DeepSpeed
users put in `client_state` next to the tensors is wider: numpy arrays and scalars (a data
position, an RNG state), the `argparse.Namespace` of the run, a path. Those types are data, not
code, so they are added here, for this load only (`torch.serialization.safe_globals`), and nothing
else: any other class is still refused, with its name. (A `defaultdict` cannot be rebuilt by torch's
unpickler at all; store `dict(d)`.) A user who trusts a class of their own adds it with
`torch.serialization.add_safe_globals([MyClass])`, which this allow-list extends.
"""
from __future__ import annotations

import argparse
import pathlib
import re

import torch


class CheckpointError(RuntimeError):
    pass


def _numpy_globals() -> list:
    """What torch's unpickler needs to rebuild np.ndarray, numpy scalars and dtypes."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:  # numpy 2 moved numpy.core to numpy._core; pickles name the module they were written with
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    names = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    # numpy >= 1.25 pickles a dtype by its class (numpy.dtypes.Float64DType ...); the object dtype
    # is left out: an array of arbitrary Python objects is not data.
    dtype_classes = getattr(np, "dtypes", None)
    if dtype_classes is not None:
        names += [getattr(dtype_classes, name) for name in dir(dtype_classes)
                  if name.endswith("DType") and name != "ObjectDType"]
    else:
        names += [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUVMm"]
    # the same functions under the other module name, so a pickle from either numpy major loads
    return names + [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                    (multiarray.scalar, "numpy.core.multiarray.scalar"),
                    (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
                    (multiarray.scalar, "numpy._core.multiarray.scalar")]


ALLOWED_GLOBALS = [argparse.Namespace,
                   pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath,
                   *_numpy_globals()]


def safe_load(path: str):
    """torch.load(path) onto the CPU, refusing anything that is not tensors, plain data or ALLOWED_GLOBALS."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {_reason(err)}") from err


def _reason(err: Exception) -> str:
    """The one line of torch's long weights_only message that says what was refused (the rest
    suggests weights_only=False, which is what this module exists to avoid)."""
    text = str(err)
    found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.I)
    if found:
        return (f"it holds {found.group(1)}, which is not tensors, plain data or one of the allowed types "
                f"(numpy arrays/scalars, argparse.Namespace, pathlib paths); if you trust the file, "
                f"allow the class with torch.serialization.add_safe_globals([...])")
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    return found.group(1) if found else text
