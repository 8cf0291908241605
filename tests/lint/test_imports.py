"""The layers of lxd_image_server, checked on its import graph (`make lint` runs this).

- No import cycles: every module can be read knowing only the modules below it.
- The upload web app (upload*.py and gunicorn_conf.py, run by gunicorn as the uploader) reaches
  only the foundation it needs, never the catalog side (scan, hashing, catalog, publish, the
  pipeline, the watcher, retention, mirrors, ...): it writes image files, nothing else.
- The command line (cli.py, cli_*.py, __main__.py) is the top: nothing else imports it, and
  cli.py itself (which loads the commands of cli_*.py by name, when used) is imported only by
  __main__.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .imports import Graph, cycles, graph, reachable

PACKAGE = Path(__file__).resolve().parents[2] / "lxd_image_server"
TOP = "lxd_image_server"

#: What the upload app may import (transitively), besides its own modules. A module added here
#: must not write streams/, read the catalog or hash: the app runs as the uploader.
WEB_MAY_USE = frozenset(
    f"{TOP}.{m}"
    for m in (
        "config",
        "fsutil",
        # the digest records the app hands over (their format; the writer reads them bounded
        # and trusts one only while the file keeps the identity it names)
        "handover",
        "htpasswd",
        "layout",
        "logs",
        "multipart",
        "overrides",
        "retention_policy",
        "settings",
    )
)


def short(name: str) -> str:
    return name.removeprefix(f"{TOP}.")


def is_web(name: str) -> bool:
    return short(name).startswith("upload") or short(name) == "gunicorn_conf"


def is_cli(name: str) -> bool:
    s = short(name)
    return s in ("cli", "__main__") or s.startswith("cli_")


def cycle_problems(g: Graph) -> list[str]:
    return ["import cycle: " + " <-> ".join(map(short, c)) for c in cycles(g)]


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
            elif short(dep) == "cli" and short(mod) != "__main__":
                problems.append(
                    f"{short(mod)} imports cli: cli.py loads the other command modules, "
                    "so what they share goes in cli_common.py"
                )
    return problems


@pytest.fixture(scope="module")
def package_graph() -> Graph:
    g = graph(PACKAGE)
    assert f"{TOP}.cli" in g and f"{TOP}.upload" in g, sorted(g)
    return g


def test_no_import_cycles(package_graph: Graph) -> None:
    assert cycle_problems(package_graph) == []


def test_the_upload_app_never_reaches_the_catalog(package_graph: Graph) -> None:
    assert web_problems(package_graph) == []


def test_nothing_imports_the_command_line(package_graph: Graph) -> None:
    assert cli_problems(package_graph) == []


# -- the checks themselves catch what they are for ---------------------------------------------


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / TOP
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_a_cycle_through_a_typing_only_import_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "pipeline.py": "from .retention import Retention\n",
            "retention.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .pipeline import Pipeline\n"
            ),
            "scan.py": "",
        },
    )
    assert cycle_problems(graph(pkg)) == ["import cycle: pipeline <-> retention"]


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
            "web/__init__.py": "",
            "web/app.py": "from ..catalog.model import Catalog\n",
            "catalog/__init__.py": "",
            "catalog/model.py": "from ..web import app\n",
        },
    )
    assert cycle_problems(graph(pkg)) == ["import cycle: catalog.model <-> web.app"]


def test_the_upload_app_reaching_the_catalog_indirectly_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "upload.py": "from .upload_store import Store\n",
            "upload_store.py": "from .layout import parse\nfrom . import settings\n",
            "settings.py": "from .hashing import HashCache\n",
            "hashing.py": "",
            "layout.py": "",
        },
    )
    assert web_problems(graph(pkg)) == [
        "the upload app reaches hashing: upload_store -> settings -> hashing"
    ]


def test_a_module_importing_the_command_line_is_found(tmp_path: Path) -> None:
    pkg = write_package(
        tmp_path,
        {
            "cli.py": "from .cli_common import Globals\n",
            "cli_common.py": "",
            "cli_ops.py": "from .cli_common import Globals\n",
            "cli_health.py": "from .cli import handle_errors\n",
            "pipeline.py": "from .cli_ops import prune_cmd\n",
            "__main__.py": "from .cli import main\n",
        },
    )
    assert cli_problems(graph(pkg)) == [
        "cli_health imports cli: cli.py loads the other command modules, "
        "so what they share goes in cli_common.py",
        "pipeline imports cli_ops: only the command line may import it",
    ]
