"""The import graph of `finetune`: no module imports itself back through others, counting imports
inside functions, and imports sit at the top of files unless they reach for an optional or heavy
package, with a comment saying why.

The files are read with `ast` (nothing is imported), so this is quick and sees every import a run
could execute, including the ones a function makes late.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "finetune"

# Packages that may be imported inside a function, beside a comment saying why: optional extras,
# and torch.distributed where only a torchrun launch needs it (the `tune` launcher must start
# without importing torch). Everything else belongs at the top of the file.
DEFERRABLE = (
    "lm_eval",
    "transformers",
    "datasets",
    "pyarrow",
    "torchao",
    "torch.utils.tensorboard",
    "wandb",
    "redis",
    "celery",
    "kombu",
    "matplotlib",
    "torch.distributed",
)


def all_modules(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folder `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """Absolute names an import statement reaches: `from a import b` reaches a, and a.b when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def dependencies(modules: dict[str, Path]) -> dict[str, set[str]]:
    """The modules of `modules` each one imports, anywhere in its file. Importing a.b.c also runs
    a/__init__ and a/b/__init__: those count too, unless the importer sits inside them."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported_names(node, name, path.name == "__init__.py"):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                        deps.add(prefix)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _comment_above(lines: list[str], index: int) -> bool:
    """Whether a comment line sits above line `index` (0-based), over any imports grouped with it."""
    index -= 1
    while index >= 0 and lines[index].strip().startswith(("import ", "from ")):
        index -= 1
    return index >= 0 and lines[index].strip().startswith("#")


def deferred_imports(modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(file, line, statement) of imports inside a function or class, except those of a deferrable
    package that carry a comment saying why (on the line, or above it)."""
    found = set()
    for name, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        for scope in ast.walk(ast.parse(source, str(path))):
            if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(scope):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                targets = imported_names(node, name, path.name == "__init__.py")
                if isinstance(node, ast.ImportFrom):
                    targets = targets[:1]  # `from torchao.x import y`: the package is what matters
                deferrable = all(any(t == p or t.startswith(p + ".") for p in DEFERRABLE) for t in targets)
                explained = "#" in lines[node.lineno - 1] or _comment_above(lines, node.lineno - 1)
                if not (deferrable and explained):
                    found.add((path.relative_to(PACKAGE_ROOT.parent).as_posix(), node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_checker_sees_cycles_through_function_level_imports_and_package_inits(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.inner import thing\n")
    (package / "sub" / "inner.py").write_text("thing = 1\n")  # inside pkg.sub: not a cycle with its own __init__
    (package / "low.py").write_text("def f():\n    from pkg.high import g\n")
    (package / "high.py").write_text("from pkg import low\nimport pkg.sub.inner\n")
    modules = all_modules(package)
    graph = dependencies(modules)
    assert graph["pkg.high"] == {"pkg.low", "pkg.sub", "pkg.sub.inner"}  # pkg itself: high sits inside it
    assert find_cycles(graph) == [["pkg.high", "pkg.low"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_finetune_modules():
    modules = all_modules()
    assert len(modules) > 40
    assert find_cycles(dependencies(modules)) == []


def test_the_config_layer_and_the_recipes_never_import_the_launcher():
    graph = dependencies(all_modules())
    for name, deps in graph.items():
        if name in ("finetune.params", "finetune.param_fields") or name.startswith(
            ("finetune.config", "finetune.recipes")
        ):
            assert not {d for d in deps if d == "finetune.cli" or d.startswith("finetune.cli.")}, name


def test_imports_are_at_the_top_of_files_unless_optional_and_heavy():
    left = [f"{path}:{line}: {statement}" for path, line, statement in deferred_imports(all_modules())]
    assert left == []
