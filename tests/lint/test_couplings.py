"""Couplings the import graph cannot see, each named in one place and checked here.

- The state directory's names: every file and directory the program keeps there is named by
  config.StateDir; no module joins a name of its own to the state directory, and the shipped
  files (systemd units, postinst) name only those.
- The environment: every variable the program reads or sets for one of its parts is named in
  envnames.py, which both sides import (`run` sets, `settings` and the upload app read); the
  units and /etc/default/lxd-image-server name only those (or others' well-known ones).
- The shipped units and the code agree on the default paths (root, state directory, upload
  socket), and the nginx site on where the catalog page lies.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from lxd_image_server import config, envnames
from lxd_image_server.catalog.page import PAGE_PATH
from lxd_image_server.service import nginx

from .imports import modules

TOP = Path(__file__).resolve().parents[2]
PACKAGE = TOP / "lxd_image_server"
UNITS = sorted((TOP / "systemd").iterdir())
POSTINST = TOP / "debian" / "lxd-image-server.postinst"
DEFAULTS = TOP / "debian" / "lxd-image-server.default"
#: variables the units set for others than this program (Python, gunicorn)
FOREIGN_ENV = frozenset({"PYTHONUNBUFFERED", "GUNICORN_CMD_ARGS"})


def state_names() -> dict[str, str]:
    """Every StateDir name, relative to the state directory -> the property naming it."""
    base = "/S"
    sd = config.StateDir(base)
    out = {}
    for attr, value in vars(config.StateDir).items():
        if isinstance(value, property):
            out[getattr(sd, attr).removeprefix(base + "/")] = attr
    return out


def _source(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"))


def _strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


_JOINS = ("os.path.join", "Path", "pathlib.Path", "join")
_STATE_ARG = re.compile(r"(^|\.)state(_dir)?$")


def state_joins(package_dir: Path) -> list[str]:
    """Paths built below the state directory outside config.py, and string constants that are
    a StateDir name (with a dot or a dash: "run" or "ssl" are ordinary words too)."""
    names = {n for n in state_names() if "." in n or "-" in n}
    problems = []
    for _, path in sorted(modules(package_dir).items()):
        if path.name == "config.py" and path.parent == package_dir:
            continue
        rel = path.relative_to(package_dir.parent)
        tree = _source(path)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) in _JOINS
                and node.args
                and _STATE_ARG.search(ast.unparse(node.args[0]))
            ):
                problems.append(
                    f"{rel}:{node.lineno}: {ast.unparse(node)} names a file in the state "
                    "directory: name it in config.StateDir"
                )
        for line, text in _strings(tree):
            if text in names:
                problems.append(f"{rel}:{line}: {text!r} is config.StateDir.{state_names()[text]}")
    return problems


def test_every_state_directory_name_is_in_state_dir() -> None:
    assert state_joins(PACKAGE) == []


def test_the_check_finds_a_name_joined_to_the_state_directory(tmp_path: Path) -> None:
    pkg = tmp_path / "lxd_image_server"
    (pkg / "catalog").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "catalog" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("import os\nX = os.path.join(state_dir, 'mine')\n")
    (pkg / "catalog" / "thing.py").write_text(
        "import os\n"
        "a = os.path.join(paths.state_dir, 'mine.json')\n"
        "b = Path(self.state, 'x')\n"
        "c = os.path.join(paths.img_dir, 'fine')\n"
        "d = 'upload-digests'\n"
    )
    assert state_joins(pkg) == [
        "lxd_image_server/catalog/thing.py:2: os.path.join(paths.state_dir, 'mine.json') names a "
        "file in the state directory: name it in config.StateDir",
        "lxd_image_server/catalog/thing.py:3: Path(self.state, 'x') names a file in the state "
        "directory: name it in config.StateDir",
        "lxd_image_server/catalog/thing.py:5: 'upload-digests' is config.StateDir.upload_digests",
    ]


def test_the_shipped_files_name_only_state_dir_names() -> None:
    """systemd units and postinst reach into the state directory by name."""
    names = state_names()
    found = []
    for path in [*UNITS, POSTINST]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(rf"(?:{re.escape(config.DEFAULT_STATE_DIR)}|\$STATE)/([\w.-]+)", text):
            found.append((path.name, m[1]))
        # postinst hands the digests' directory name to its python helper as an argument
        for m in re.finditer(r'python3 - "\$STATE" ([\w.-]+) "\$UPLOADER"', text):
            found.append((path.name, m[1]))
    assert found, "the units and postinst name no file of the state directory any more?"
    # .ssh is ssh's: the writer's home is the state directory
    assert [(f, n) for f, n in found if n not in names and n != ".ssh"] == []
    assert ("lxd-image-server-upload.service", "upload-digests") in found


# -- the environment ---------------------------------------------------------------------------


def env_literals(package_dir: Path) -> list[str]:
    """String constants, outside envnames.py, that are the name of one of the program's
    environment variables."""
    names = set(envnames.ALL)
    problems = []
    for _, path in sorted(modules(package_dir).items()):
        if path.name == "envnames.py" and path.parent == package_dir:
            continue
        rel = path.relative_to(package_dir.parent)
        for line, text in _strings(_source(path)):
            if text in names:
                problems.append(f"{rel}:{line}: {text!r}: use envnames")
    return problems


def test_every_environment_name_comes_from_envnames() -> None:
    assert env_literals(PACKAGE) == []


def test_the_check_finds_a_name_spelled_out(tmp_path: Path) -> None:
    pkg = tmp_path / "lxd_image_server"
    (pkg / "web").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "web" / "__init__.py").write_text("")
    (pkg / "envnames.py").write_text('SLOTS = "UPLOAD_SLOTS_DIR"\n')
    (pkg / "web" / "app.py").write_text(
        'import os\n"""UPLOAD_SLOTS_DIR in a sentence is fine."""\n'
        'a = os.environ.get("UPLOAD_SLOTS_DIR")\nb = envnames.UPLOAD_SLOTS_DIR\n'
    )
    assert env_literals(pkg) == ["lxd_image_server/web/app.py:3: 'UPLOAD_SLOTS_DIR': use envnames"]


def test_envnames_names_each_variable_once() -> None:
    values = [v for k, v in vars(envnames).items() if k.isupper() and isinstance(v, str)]
    assert sorted(values) == sorted(set(values)) == sorted(envnames.ALL)


def test_the_man_page_names_every_variable() -> None:
    man = (TOP / "man" / "lxd-image-server.1").read_text().replace("\\", "")
    section = man.split(".SH ENVIRONMENT", 1)[1].split(".SH ", 1)[0]
    documented = set(re.findall(r"^\.B ([A-Z][A-Z0-9_]+)$", section, re.M))
    # systemd's, read where a unit sets it
    assert set(envnames.ALL) - {envnames.RUNTIME_DIRECTORY} - documented == set()


def _unit_env(text: str) -> Iterator[str]:
    for line in text.splitlines():
        if line.startswith("Environment="):
            for assignment in line.removeprefix("Environment=").split():
                yield assignment.split("=", 1)[0]


def test_the_units_and_the_defaults_file_set_only_known_variables() -> None:
    set_by_units = {name for unit in UNITS for name in _unit_env(unit.read_text())}
    in_defaults = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", DEFAULTS.read_text(), re.M))
    assert set_by_units and in_defaults
    assert (set_by_units | in_defaults) - set(envnames.ALL) - FOREIGN_ENV == set()


def _entrypoint_reads() -> set[str]:
    """What the container's entrypoint reads itself: $NAME, ${NAME...} and `flag NAME`."""
    text = (TOP / "container" / "entrypoint.sh").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", code)) | set(
        re.findall(r"\bflag ([A-Z][A-Z0-9_]+)", code)
    )


def test_the_container_and_kubernetes_set_only_what_something_reads() -> None:
    """The deployment and the Containerfile's example set variables that the entrypoint reads
    or the program does (envnames)."""
    deployment = (TOP / "kubernetes" / "deployment.yaml").read_text()
    env_block = deployment.split("env:", 1)[1].split("ports:", 1)[0]
    set_by_deployment = set(re.findall(r"- name: ([A-Z][A-Z0-9_]+)$", env_block, re.M))
    containerfile = (TOP / "container" / "Containerfile").read_text()
    set_by_example = set(re.findall(r"-e ([A-Z][A-Z0-9_]+)=", containerfile))
    assert set_by_deployment and set_by_example
    known = _entrypoint_reads() | set(envnames.ALL)
    assert (set_by_deployment | set_by_example) - known == set()


# -- the units, the nginx site and the code ----------------------------------------------------


def test_the_units_use_the_default_paths() -> None:
    text = "\n".join(u.read_text() for u in UNITS)
    state_dirs = set(re.findall(r"--state-dir (\S+)", text))
    roots = set(re.findall(r"--root-dir (\S+)", text))
    sockets = set(re.findall(r"^ListenStream=(\S+)", text, re.M))
    img_dirs = set(re.findall(rf"{envnames.IMG_DIR}=(\S+)", text))
    assert state_dirs == {config.DEFAULT_STATE_DIR}
    assert roots == {config.DEFAULT_ROOT}
    assert sockets == {config.DEFAULT_UPLOAD_SOCKET}
    assert img_dirs == {f"{config.DEFAULT_ROOT}/images"}


def _shell_vars(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)=(\S+)$", path.read_text(), re.M))


def test_the_package_scripts_use_the_names_of_the_code() -> None:
    """postinst makes what the code expects (the tree, the state directory, the credentials,
    their group, the nginx site), postrm removes what `init` wrote."""
    v = _shell_vars(POSTINST)
    assert v["ROOT"] == config.DEFAULT_ROOT
    assert v["STATE"] == config.DEFAULT_STATE_DIR
    assert v["HTPASSWD"] == config.DEFAULT_HTPASSWD
    assert v["AUTH_GROUP"] == config.CREDENTIALS_GROUP
    assert v["SITE"] == f"{config.DEFAULT_NGINX_DIR}/sites-available/{nginx.SITE_NAME}"
    postrm = (TOP / "debian" / "lxd-image-server.postrm").read_text()
    for made in (
        f"{config.DEFAULT_NGINX_DIR}/sites-enabled/{nginx.SITE_NAME}",
        f"{config.DEFAULT_NGINX_DIR}/snippets/{nginx.SITE_NAME}.conf",
        f"{config.DEFAULT_SSL_DIR}/nginx.crt",
        config.DEFAULT_STATE_DIR,
    ):
        assert made in postrm, made


def test_the_upload_socket_is_for_nginx_workers() -> None:
    socket = (TOP / "systemd" / "lxd-image-server-upload.socket").read_text()
    assert f"\nSocketGroup={config.NGINX_USER}\n" in socket


def test_the_nginx_site_serves_the_page_where_it_is_written() -> None:
    text = (TOP / "nginx" / "locations.conf.in").read_text()
    assert f"try_files /{PAGE_PATH} " in text
    assert f"location = /{PAGE_PATH} " in text


# -- docs/architecture.md and the code ---------------------------------------------------------


def layer_rows(text: str) -> dict[str, str]:
    """The rows of the layer table of docs/architecture.md, by folder ("" for the foundation)."""
    section = text.split("## The layers, bottom to top", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| foundation"):
            rows[""] = line
        elif m := re.match(r"\| [^|]+ \| `(\w+)/`", line):
            rows[m[1]] = line
    return rows


def undocumented(package_dir: Path, text: str) -> list[str]:
    rows = layer_rows(text)
    missing = []
    for _, path in sorted(modules(package_dir).items()):
        rel = path.relative_to(package_dir)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        folder = rel.parent.name if len(rel.parts) > 1 else ""
        if f"`{path.stem}`" not in rows.get(folder, ""):
            missing.append(str(rel))
    return missing


def test_every_module_is_in_the_architecture_table() -> None:
    """docs/architecture.md lists each module in its layer's row (so a moved or new module
    is said where it is)."""
    assert undocumented(PACKAGE, (TOP / "docs" / "architecture.md").read_text()) == []
