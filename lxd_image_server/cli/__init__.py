"""The lxd-image-server command (click): root.py (the group and its own commands), and the
command modules it loads by name (ops.py, mirror.py, health.py), with common.py between them.

`main` is the console script's entry point, `lxd_image_server.cli:main` (and `python3 -m
lxd_image_server`'s). Before it loads click and the group, it reads the arguments for an
import of one image, whose root it starts copying at once (early.py). The group's module is
root.py, not main.py, so that the function `main` here does not hide a module of the same name
(`lxd_image_server.cli.main` would then name the function, not the module).
"""

import sys


def main() -> None:
    from lxd_image_server.cli import early

    request = early.parse(sys.argv[1:])
    if request is None:
        from lxd_image_server.cli.root import console_main

        console_main()
        return
    # One image's import: a short command, which ends with its process. The cyclic garbage
    # collector stays off (gcpause.py), which saves it a few milliseconds of CPU time in its
    # start-up (its imports make many objects, none garbage); what it allocates later is
    # freed by reference counting as ever.
    from lxd_image_server.gcpause import cyclic_gc_paused

    with cyclic_gc_paused():
        started = early.start(request)
        from lxd_image_server.cli.root import console_main

        console_main(started)


__all__ = ["main"]
