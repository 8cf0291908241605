"""The layers of lxd_image_server, checked on its import graph (`make lint` runs this).

The folders are the layers (docs/architecture.md): the foundation is the package's top-level
modules; above it tree/, catalog/, mirror/, ops/, service/ and cli/, in that order; beside them
web/, the upload app.

- No import cycles: every module can be read knowing only the modules below it.
- Each package imports only packages at or below it (LAYERS); nothing but web/ imports web/.
- The upload app (web/, run by gunicorn as the uploader) reaches only the foundation it needs
  and tree.layout, tree.overrides, tree.handover, never the catalog side (tree.scan, catalog/,
  mirror/, ops/, ...): it writes image files (and the digests it hands over), nothing else.
- The command line (cli/, __main__.py) is the top: nothing else imports it, and cli/root.py
  (which loads the command modules by name, when used) is imported only by __main__.py and
  cli/__init__.py.
- A subpackage's __init__.py imports nothing (cli/ excepted: it exposes `main`): Python runs it
  for every module of the subpackage, an import the graph below does not show.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .imports import Graph, cycles, graph, modules, reachable

PACKAGE = Path(__file__).resolve().parents[2] / "lxd_image_server"
TOP = "lxd_image_server"

#: bottom to top: a module imports only modules of its own layer or of those before it
LAYERS = ("foundation", "tree", "catalog", "mirror", "ops", "service", "cli")
WEB = "web"
#: what web/ may import besides itself (the foundation it needs is listed in WEB_MAY_USE)
WEB_LAYERS = ("foundation", "tree", WEB)

#: What the upload app may import (transitively), besides its own modules. A module added here
#: must not write streams/, read the catalog or hash: the app runs as the uploader.
WEB_MAY_USE = frozenset(
    f"{TOP}.{m}"
    for m in (
        "config",
        # the names of the environment variables it reads (`run` sets them)
        "envnames",
        "fsutil",
        "htpasswd",
        "logs",
        "retention_policy",
        "settings",
        "tree",
        # the digest records the app hands over (their format; the writer reads them bounded
        # and trusts one only while the file keeps the identity it names)
        "tree.handover",
        "tree.layout",
        "tree.overrides",
    )
)

#: the modules that may import cli/root.py (the group that loads the command modules)
ROOT_IMPORTERS = frozenset({f"{TOP}.__main__", f"{TOP}.cli"})


def short(name: str) -> str:
    return name.removeprefix(TOP).removeprefix(".") or TOP


def layer(name: str) -> str:
    """The layer of a module: its subpackage, or the foundation (top-level modules)."""
    s = short(name)
    if s == "__main__":
        return "cli"
    first = s.split(".")[0]
    return first if first in (*LAYERS, WEB) else "foundation"


def is_web(name: str) -> bool:
    return layer(name) == WEB


def is_cli(name: str) -> bool:
    return layer(name) == "cli"


def cycle_problems(g: Graph) -> list[str]:
    return ["import cycle: " + " <-> ".join(map(short, c)) for c in cycles(g)]


def layer_problems(g: Graph) -> list[str]:
    problems = []
    for mod in sorted(g):
        for dep in sorted(g[mod]):
            low, high = layer(mod), layer(dep)
            if low == WEB:
                ok = high in WEB_LAYERS
            else:
                ok = high != WEB and LAYERS.index(high) <= LAYERS.index(low)
            if not ok:
                problems.append(f"{short(mod)} ({low}) imports {short(dep)} ({high}): a layer up")
    return problems


def web_problems(g: Graph) -> list[str]:
    web = [m for m in g if is_web(m)]
    problems = []
    for mod, path in sorted(reachable(g, web).items()):
        if not is_web(mod) and mod not in WEB_MAY_USE and mod != TOP:
            problems.append(
                f"the upload app reaches {short(mod)}: " + " -> ".join(map(short, path))
            )
    return problems


def cli_problems(g: Graph) -> list[str]:
    problems = []
    for mod in sorted(g):
        for dep in sorted(g[mod]):
            if is_cli(dep) and not is_cli(mod):
                problems.append(
                    f"{short(mod)} imports {short(dep)}: only the command line may import it"
                )
            elif short(dep) in ("cli", "cli.root") and mod not in ROOT_IMPORTERS:
                problems.append(
                    f"{short(mod)} imports {short(dep)}: cli/root.py loads the other command "
                    "modules, so what they share goes in cli/common.py"
                )
    return problems


def init_problems(package_dir: Path) -> list[str]:
    problems = []
    for name, path in sorted(modules(package_dir).items()):
        if path.name != "__init__.py" or short(name) in (TOP, "cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(tree)):
            problems.append(f"{short(name)}/__init__.py imports: keep it a docstring")
    return problems


@pytest.fixture(scope="module")
def package_graph() -> Graph:
    g = graph(PACKAGE)
    assert f"{TOP}.cli.root" in g and f"{TOP}.web.upload" in g, sorted(g)
    return g


def test_no_import_cycles(package_graph: Graph) -> None:
    assert cycle_problems(package_graph) == []


def test_each_package_imports_only_those_below_it(package_graph: Graph) -> None:
    assert layer_problems(package_graph) == []


def test_the_upload_app_never_reaches_the_catalog(package_graph: Graph) -> None:
    assert web_problems(package_graph) == []


def test_nothing_imports_the_command_line(package_graph: Graph) -> None:
    assert cli_problems(package_graph) == []


def test_subpackage_inits_import_nothing() -> None:
    assert init_problems(PACKAGE) == []


def test_every_module_is_in_a_layer(package_graph: Graph) -> None:
    """A new subpackage needs its place in LAYERS (or it would pass as the foundation)."""
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == {*LAYERS, WEB} - {"foundation"}


# -- the checks themselves catch what they are for ---------------------------------------------


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / TOP
    inits = {f"{Path(n).parent}/__init__.py": "" for n in files if "/" in n}
    for name, text in {"__init__.py": "", **inits, **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_a_cycle_through_a_typing_only_import_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "catalog/pipeline.py": "from lxd_image_server.catalog.retention import Retention\n",
            "catalog/retention.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from lxd_image_server.catalog.pipeline import Pipeline\n"
            ),
            "tree/scan.py": "",
        },
    )
    assert cycle_problems(graph(pkg)) == ["import cycle: catalog.pipeline <-> catalog.retention"]


def test_a_cycle_through_a_function_level_absolute_import_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "a.py": "def f():\n    import lxd_image_server.b\n",
            "b.py": "from lxd_image_server import c\n",
            "c.py": "from . import a\n",
        },
    )
    assert cycle_problems(graph(pkg)) == ["import cycle: a <-> b <-> c"]


def test_a_cycle_between_subpackages_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "web/app.py": "from ..catalog.model import Catalog\n",
            "catalog/model.py": "from lxd_image_server.web import app\n",
        },
    )
    assert cycle_problems(graph(pkg)) == ["import cycle: catalog.model <-> web.app"]


def test_an_import_a_layer_up_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "settings.py": "",
            "tree/scan.py": "from lxd_image_server.catalog.hashing import HashCache\n",
            "catalog/hashing.py": "from lxd_image_server import settings\n",
            "mirror/worker.py": "from lxd_image_server.ops.updating import update\n",
            "ops/updating.py": "from lxd_image_server.mirror.worker import Mirrors\n",
            "service/run.py": "from lxd_image_server.web.upload import app\n",
            "web/upload.py": "from lxd_image_server.tree import layout\n",
            "tree/layout.py": "",
        },
    )
    assert layer_problems(graph(pkg)) == [
        "mirror.worker (mirror) imports ops.updating (ops): a layer up",
        "service.run (service) imports web.upload (web): a layer up",
        "tree.scan (tree) imports catalog.hashing (catalog): a layer up",
    ]


def test_the_upload_app_reaching_the_catalog_indirectly_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "web/upload.py": "from lxd_image_server.web.upload_store import Store\n",
            "web/upload_store.py": (
                "from lxd_image_server.tree.layout import parse\n"
                "from lxd_image_server import settings\n"
            ),
            "settings.py": "from lxd_image_server.tree.scan import scan\n",
            "tree/scan.py": "",
            "tree/layout.py": "",
        },
    )
    assert web_problems(graph(pkg)) == [
        "the upload app reaches tree.scan: web.upload_store -> settings -> tree.scan"
    ]


def test_a_module_importing_the_command_line_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "cli/__init__.py": "from lxd_image_server.cli.root import main\n",
            "cli/root.py": "from lxd_image_server.cli.common import Globals\n",
            "cli/common.py": "",
            "cli/ops.py": "from lxd_image_server.cli.common import Globals\n",
            "cli/health.py": "from lxd_image_server.cli.root import handle_errors\n",
            "catalog/pipeline.py": "from lxd_image_server.cli.ops import prune_cmd\n",
            "__main__.py": "from lxd_image_server.cli import main\n",
        },
    )
    assert cli_problems(graph(pkg)) == [
        "catalog.pipeline imports cli.ops: only the command line may import it",
        "cli.health imports cli.root: cli/root.py loads the other command modules, "
        "so what they share goes in cli/common.py",
    ]


def test_an_import_in_a_subpackage_init_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "catalog/__init__.py": '"""The catalog."""\n',
            "tree/__init__.py": "from lxd_image_server.tree.scan import scan\n",
            "tree/scan.py": "",
            "cli/__init__.py": "from lxd_image_server.cli.root import main\n",
            "cli/root.py": "",
        },
    )
    assert init_problems(pkg) == ["tree/__init__.py imports: keep it a docstring"]
