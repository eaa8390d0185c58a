"""The package keeps its layout rules (read with `ast`, nothing imported):

- no import circle between its modules, counting imports at module level and inside functions alike (only the
  body of an `if TYPE_CHECKING:` block is left out: it never runs);
- no private module or name (a leading underscore) imported from another folder; inside its own folder a
  private module or name is fine;
- no module over 400 lines and no function over 80 lines (the benchmarks included).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorsa_hf"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    """One import inside the package: `importer` imports `name` from module `target` (`name` None for
    `import target`)."""

    importer: str
    target: str
    name: str | None
    line: int


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at `package` (a folder with `__init__.py`)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those only run under `if TYPE_CHECKING:`."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)
    return found


def _folder(module: str, modules: dict[str, Path]) -> str:
    """The package a module's file sits in (a package's own `__init__` sits in itself)."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def package_imports(package: Path) -> tuple[dict[str, Path], list[Import]]:
    """The package's modules and every import of one of them by another, names resolved to dotted modules."""
    modules = module_names(package)
    root = package.name
    imports = []
    for module, path in modules.items():
        base = _folder(module, modules)
        nodes = _import_nodes(ast.parse(path.read_text(), filename=str(path)))
        for node in sorted(nodes, key=lambda node: (node.lineno, node.col_offset)):
            if isinstance(node, ast.Import):
                imports += [Import(module, alias.name, None, node.lineno) for alias in node.names]
                continue
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                target = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:
                    imports.append(Import(module, submodule, None, node.lineno))
                else:
                    imports.append(Import(module, target, alias.name, node.lineno))
    inside = [i for i in imports if i.target == root or i.target.startswith(root + ".")]
    return modules, [i for i in inside if i.target in modules]


def import_circles(package: Path) -> list[list[str]]:
    """Each set of modules that import one another in a circle (strongly connected components), sorted."""
    modules, imports = package_imports(package)
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for item in imports:
        graph[item.importer].add(item.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(circles)


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_imports_across_folders(package: Path) -> list[str]:
    """`importer:line imports target[.name]` for every private module or name imported from another folder.

    A private module (`pkg/sub/_x.py`) belongs to its folder (`pkg.sub`), and so does a private name defined in any
    module of that folder (or in the folder's `__init__`): only modules in that same folder may import them.
    """
    modules, imports = package_imports(package)
    found = []
    for item in imports:
        parts = item.target.split(".")
        owners = [".".join(parts[:j]) for j, part in enumerate(parts) if _private(part)]
        if item.name is not None and _private(item.name):
            owners.append(_folder(item.target, modules))
        if any(owner != _folder(item.importer, modules) for owner in owners):
            found.append(f"{item.importer}:{item.line} imports {item.target}" + (f".{item.name}" if item.name else ""))
    return found


def oversized(paths: list[Path]) -> list[str]:
    """Modules over MAX_MODULE_LINES lines and functions over MAX_FUNCTION_LINES lines, with their sizes."""
    found = []
    for path in paths:
        text = path.read_text()
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    return found


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A synthetic package `pkg` under `root`: {relative path: source}."""
    for relative, source in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "pkg"


# The checker, on small synthetic packages.


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import g\n",
        "b.py": "def g():\n    from .sub.c import h\n    return h\n",
        "sub/__init__.py": "",
        "sub/c.py": "import pkg.a\n",
        "d.py": "from . import a\n",
    })
    assert import_circles(package) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_type_checking_imports_make_no_circle(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\nelse:\n    A = None\n",
    })
    assert import_circles(package) == []


def test_a_package_importing_its_own_init_is_a_circle(tmp_path):
    package = write_package(tmp_path, {"__init__.py": "from .a import f\nX = 1\n", "a.py": "from . import X\n"})
    assert import_circles(package) == [["pkg", "pkg.a"]]


def test_private_imports_across_folders_are_found(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "from ._impl import run\n",
        "_impl.py": "def run():\n    from .sub.tools import _helper\n    return _helper\n",
        "sub/__init__.py": "",
        "sub/tools.py": "def _helper():\n    from .._impl import run\n    return run\n",
        "sub/user.py": "from ._private import x\nfrom .tools import _helper\n",
        "sub/_private.py": "x = 1\n",
        "other.py": "import pkg._impl\nfrom .sub import _private\n",
    })
    assert private_imports_across_folders(package) == [
        "pkg._impl:2 imports pkg.sub.tools._helper",
        "pkg.other:2 imports pkg.sub._private",
        "pkg.sub.tools:2 imports pkg._impl.run",
    ]


def test_private_imports_within_a_folder_are_allowed(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "from ._impl import _run\n",
        "_impl.py": "from ._shared import _constant\n_run = _constant\n",
        "_shared.py": "_constant = 1\n__all__ = ['_constant']\n",
        "sub/__init__.py": "from ._base import Base\nfrom .. import __version__\n",
        "sub/_base.py": "class Base: ...\n",
    })
    assert private_imports_across_folders(package) == []


def test_oversized_modules_and_functions_are_found(tmp_path):
    long_function = "def long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    short_function = "def short():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
    (tmp_path / "big.py").write_text(long_function + "\n" * (MAX_MODULE_LINES - MAX_FUNCTION_LINES))
    (tmp_path / "fine.py").write_text(short_function + "\n" * (MAX_MODULE_LINES - MAX_FUNCTION_LINES - 1))
    assert oversized([tmp_path / "big.py", tmp_path / "fine.py"]) == [
        f"{tmp_path / 'big.py'}: {MAX_MODULE_LINES + 1} lines",
        f"{tmp_path / 'big.py'}:1 long(): {MAX_FUNCTION_LINES + 1} lines",
    ]


# The package itself.


def test_the_package_has_no_import_circle():
    circles = import_circles(PACKAGE)
    assert not circles, "\n".join(" <-> ".join(circle) for circle in circles)


def test_the_package_imports_no_private_module_or_name_across_folders():
    found = private_imports_across_folders(PACKAGE)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", ["lorsa_hf", "benchmarks"])
def test_modules_and_functions_stay_small(folder):
    found = oversized(sorted((ROOT / folder).rglob("*.py")))
    assert not found, "\n".join(found)
