"""The lxd-image-server command (click): root.py (the group and its own commands), and the
command modules it loads by name (ops.py, mirror.py, health.py), with common.py between them.

`main` is the console script's entry point, `lxd_image_server.cli:main`. The group's module is
root.py, not main.py, so that the function `main` exposed here does not hide a module of the
same name (`lxd_image_server.cli.main` would then name the function, not the module).
"""

from lxd_image_server.cli.root import console_main as main

__all__ = ["main"]
