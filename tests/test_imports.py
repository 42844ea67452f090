"""The layout's promises, checked on the source: no import cycles, and a framework (kpod/*.py,
kpod/config/) that reaches kernel, cgroup and component code only where it wires them.

The import graph is read from the source (every import statement, those inside functions and
`if TYPE_CHECKING:` blocks included), so a lazy import cannot hide a cycle; each module is then
also imported on its own, with no other project module loaded before it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> import name (pyproject.toml's package-dir).
ROOTS = {"kpod": "kpod", "receivers": "kpod.receivers", "processors": "kpod.processors", "exporters": "kpod.exporters"}

FRAMEWORK_OUTSIDE = ("kpod.kernel", "kpod.cgroup", "kpod.receivers", "kpod.processors", "kpod.exporters")
# (framework module, what it reaches) -> why that is the framework wiring components, not using them.
ALLOWED = {
    ("kpod.agent", "kpod.cgroup.index"): "the agent builds the cgroup index every component gets in its Context",
    ("kpod.agent", "kpod.cgroup.mounts"): "... from the cgroup2 mount it finds in mountinfo",
    ("kpod.agent", "kpod.cgroup.keptfds"): "... after raising the soft RLIMIT_NOFILE that the index's kept "
    "descriptors take their shares of",
    ("kpod.cli", "kpod.cgroup.mounts"): "`kpod-metrics check` prints the node's cgroup layout (that command only)",
    ("kpod.cli", "kpod.kernel.preflight"): "`kpod-metrics check` prints the kernel's facts (that command only)",
    ("kpod.cli", "kpod.kernel.ebpf"): "`kpod-metrics check` asks whether seccomp refuses bpf() "
    "(that command only)",
    ("kpod.agentmetrics", "kpod.kernel.ebpf"): "looked up in sys.modules, never imported: the BPF self-metrics "
    "exist only when an eBPF receiver loaded the module",
}


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder, name in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((name, *parts))] = path
    return modules


MODULES = module_files()


def imports_of(path: Path) -> set[str]:
    """The project modules a file imports (a `from pkg import name` of a submodule counts as
    that submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES}


def named_in_strings(path: Path) -> set[str]:
    """Project modules (not packages: their names double as logger and entry-point group
    names) a file names in a string constant, such as a sys.modules key."""
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and node.value in MODULES and MODULES[node.value].name != "__init__.py"
    }


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_the_graph_sees_the_layout() -> None:
    """The graph is not empty by mistake: the packages are found, with the edges we know."""
    assert {"kpod.config.assemble", "kpod.kernel.ebpf", "kpod.cgroup.index", "kpod.exporters.otlp.queue"} <= set(GRAPH)
    assert "kpod.kernel.libbpf" in GRAPH["kpod.kernel.btflayout"]
    assert "kpod.config.assemble" in GRAPH["kpod.config"]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_framework_reaches_kernel_cgroup_and_components_only_where_it_wires_them() -> None:
    framework = [m for m, p in MODULES.items() if p.parent in (REPO / "kpod", REPO / "kpod" / "config")]
    assert "kpod.pipeline" in framework and "kpod.config.assemble" in framework
    reached = {
        (module, target)
        for module in framework
        for target in GRAPH[module] | named_in_strings(MODULES[module])
        if target.startswith(FRAMEWORK_OUTSIDE)
    }
    assert reached == set(ALLOWED), sorted(reached ^ set(ALLOWED))


def test_kernel_and_cgroup_access_do_not_use_components_or_each_other() -> None:
    for module, targets in GRAPH.items():
        if module.startswith("kpod.kernel"):
            assert not {t for t in targets if t.startswith(("kpod.cgroup", *FRAMEWORK_OUTSIDE[2:]))}, module
        if module.startswith("kpod.cgroup"):
            assert not {t for t in targets if t.startswith(("kpod.kernel", *FRAMEWORK_OUTSIDE[2:]))}, module


def test_the_statfs_worker_imports_only_kernel_access() -> None:
    """kpod.fsprobe runs in its own process (docs/SECURITY.md): it must stay small and must
    not drag the agent in."""
    reached = {t for module, targets in GRAPH.items() if module.startswith("kpod.fsprobe") for t in targets}
    assert reached <= {m for m in MODULES if m.startswith(("kpod.fsprobe", "kpod.kernel.inroot"))}, reached


# Each module on its own: project modules are dropped from sys.modules between imports, so a
# module that only works when another was imported first fails here.
ALONE = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "kpod" or m.startswith("kpod.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failed))
"""


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    done = subprocess.run(
        [sys.executable, "-c", ALONE, *sorted(MODULES)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_product_does_not_import_what_only_tests_install() -> None:
    """pyproject.toml lists prometheus_client (our exposition's reader in the tests), pytest and
    hypothesis under the `test` extra only: no product module may need them."""
    test_only = {"prometheus_client", "pytest", "hypothesis"}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name.split(".")[0] for name in names} & test_only, module
