"""ds_lab's layout: imports only run down the layers, no circles, one door to torch.distributed.

Every `import` in every ds_lab file is read with `ast` (imports inside functions too: a lazy
import is still a dependency). A module may import its own layer or a lower one; the layers, from
the bottom:
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ds_lab"

# Bottom first. A module's layer is that of the longest name here that it starts with ("" is
# ds_lab/__init__.py). Lower layers learn about upper ones through callbacks (comm.add_listener,
# events), never by importing them.
LAYERS = (
    ("units", "comm", "data", "ops", "accelerator"),  # leaves: torch at most
    ("config",),  # DeepSpeed JSON -> dataclasses
    ("monitor",),  # memory ledger, event stream, dashboard
    ("optim", "parallel", "models"),
    ("runtime", "profiling"),  # precision, ready, data_parallel, lr_schedules, checkpoint, mode (the seam), ...
    ("zero",),
    ("runtime.engine", "modes"),  # the one engine path, and the table that picks its mode
    ("pipe",),  # pipeline parallel: PipelineModule, schedules, p2p, the PipelineEngine (a DeepSpeedEngine)
    ("", "launch", "train", "cli", "lab", "hf_export", "generate", "utils",
     "arguments", "checkpointing", "moe", "runner"),  # the public API, the entry points, the course's helpers
)

# (importer, imported) edges that break the rules today, each with an owner removing it. Empty since
# the engine seam (runtime.engine and runtime.checkpoint no longer import ds_lab.zero; ds_lab.modes does).
ALLOWED_FOR_NOW: set = set()


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> set:
    """The ds_lab modules `name` imports (names relative to ds_lab; "" is ds_lab itself)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(["ds_lab"] + [p for p in package[:len(package) - node.level + 1] if p])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from ds_lab import comm` imports the module ds_lab.comm; `from ds_lab.config import X`, ds_lab.config
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}"[7:] in MODULES else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "ds_lab" or target.startswith("ds_lab."):
                found.add(target[7:])
    return found - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or (prefix and name.startswith(prefix + ".")) or (not prefix and not name)
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"ds_lab.{name} has no layer: add it (or its package) to LAYERS in {__file__}")
    return best


def _allowed(source: str, target: str) -> bool:
    return any((source == s or source.startswith(s + ".")) and (target == t or target.startswith(t + "."))
               for s, t in ALLOWED_FOR_NOW)


def _cycles(graph: dict) -> list:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _without_allowed(graph: dict) -> dict:
    return {source: {t for t in targets if not _allowed(source, t)} for source, targets in graph.items()}


def _package(name: str) -> str:
    """The top-level part of ds_lab a module belongs to (comm, config, runtime, ...; '' for ds_lab)."""
    return name.split(".")[0]


def test_the_reader_sees_every_import_kind():
    assert "comm" in GRAPH["launch"] and "monitor.events" in GRAPH["launch"]  # from ds_lab(.monitor) import x
    assert "config" in GRAPH["runtime.lr_schedules"]  # from ds_lab.config import Names
    assert "runtime.engine" in GRAPH[""]  # an import inside a function counts


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_down_the_layers(name):
    upward = [target for target in sorted(GRAPH[name])
              if _layer(target) > _layer(name) and not _allowed(name, target)]
    assert not upward, (f"ds_lab.{name} (layer {_layer(name)}) imports {['ds_lab.' + t for t in upward]} from a "
                        f"layer above; move the shared piece down, or let the upper layer pass it in (a callback)")


def test_no_file_imports_itself_through_others():
    cycles = _cycles(_without_allowed(GRAPH))
    assert not cycles, f"import circles between files: {cycles}"


def test_no_package_imports_itself_through_others():
    packages: dict = {}
    for source, targets in _without_allowed(GRAPH).items():
        outside = {_package(t) for t in targets} - {_package(source)}
        packages.setdefault(_package(source), set()).update(outside)
    cycles = _cycles(packages)
    assert not cycles, f"import circles between packages: {cycles}"


def test_only_comm_imports_torch_distributed():
    for name, path in MODULES.items():
        if name == "comm" or name.startswith("comm."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) else []
            assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in modules), \
                f"ds_lab/{path.relative_to(ROOT)} imports torch.distributed; go through ds_lab.comm (the one door)"


def test_files_stay_small():
    big = {str(path.relative_to(ROOT)): n for path in MODULES.values()
           if (n := len(path.read_text(encoding="utf-8").splitlines())) >= 400}
    assert not big, f"files of 400 lines or more teach two things; split them: {big}"


def test_every_file_states_its_idea():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if tree.body:
            assert ast.get_docstring(tree), f"ds_lab/{path.relative_to(ROOT)} has no docstring stating its idea"
