"""`import` of one image, started before the command line is parsed (ops/import_early.py).

The console script reads its arguments here first, before it loads click and the rest: if
they are, beyond doubt, `[global options] import [options] FILE [FILE]` (the options only
those below, so nothing is misread; not --move, which does not copy), the root's copy starts
at once, in a thread, into the images/ directory the options (or, without a directory
option, the configuration) name. click then parses the same arguments as ever; the import uses
the copy only if it is of the file its plan names (import_early.EarlyRoot.take), and
anything else (another command, other options, a failure) leaves it unused and removed.
"""

from __future__ import annotations

from collections.abc import Sequence

from lxd_image_server.ops.import_early import EarlyRoot

# (imported before anything else: no dataclasses, no typing, nothing the copy does not need
# to start)

#: the group's options that take a value, and its flags
GLOBAL_VALUES = frozenset({"--config", "--state-dir", "--log-file"})
GLOBAL_FLAGS = frozenset({"--verbose", "-v"})
#: import's options that take a value (tree and naming options), and its flags
IMPORT_VALUES = frozenset(
    {
        "--root-dir", "--root_dir", "--img-dir", "--img_dir", "--streams-dir", "--streams_dir",
        "--os", "--release", "--arch", "--variant", "--serial",
    }
)  # fmt: skip
IMPORT_FLAGS = frozenset({"--force"})
COMMAND = "import"


class EarlyImport:
    """What the arguments say where one image's import is concerned."""

    def __init__(
        self,
        files: tuple[str, ...],
        config: str | None = None,
        root_dir: str | None = None,
        img_dir: str | None = None,
        streams_dir: str | None = None,
    ) -> None:
        self.files = files
        self.config = config
        self.root_dir = root_dir
        self.img_dir = img_dir
        self.streams_dir = streams_dir

    def images_dir(self) -> str:
        """images/, as the import command will find it (cli/common.tree_paths)."""
        from lxd_image_server.config import Paths

        root_dir = self.root_dir
        if root_dir is None and self.img_dir is None and self.streams_dir is None:
            from lxd_image_server import settings

            root_dir = settings.load(self.config).root_dir
        return Paths.resolve(root_dir, self.img_dir, self.streams_dir).img_dir


def _options(
    args: Sequence[str], values: frozenset[str], flags: frozenset[str]
) -> tuple[dict[str, str], list[str]] | None:
    """(option -> value, the other arguments), None for anything not understood. Stops at the
    first argument that is not an option when `flags` are the group's (the command)."""
    given: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i + 1 :]
            break
        name, eq, value = arg.partition("=")
        if name in values and arg.startswith("--"):
            if not eq:
                i += 1
                if i == len(args):
                    return None
                value = args[i]
            given[name.replace("_", "-")] = value
        elif arg in flags:
            given[arg] = ""
        elif arg.startswith("-") and arg != "-":
            return None
        elif flags is GLOBAL_FLAGS:
            rest += args[i:]
            break
        else:
            rest.append(arg)
        i += 1
    return given, rest


def parse(argv: Sequence[str]) -> EarlyImport | None:
    """The import of one image that `argv` (without the program's name) asks for, or None."""
    group = _options(argv, GLOBAL_VALUES, GLOBAL_FLAGS)
    if group is None or not group[1] or group[1][0] != COMMAND:
        return None
    command = _options(group[1][1:], IMPORT_VALUES, IMPORT_FLAGS)
    if command is None or not 1 <= len(command[1]) <= 2:
        return None
    given = command[0]
    return EarlyImport(
        files=tuple(command[1]),
        config=group[0].get("--config"),
        root_dir=given.get("--root-dir"),
        img_dir=given.get("--img-dir"),
        streams_dir=given.get("--streams-dir"),
    )


def start(request: EarlyImport) -> EarlyRoot:
    """The root's copy `request` asks for (`parse`), started."""
    return EarlyRoot(request.files, request.images_dir).start()
