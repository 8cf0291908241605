"""What `import` and `push` share on the command line: the naming options (what metadata.yaml
would otherwise say), the files given, the progress bar on a terminal."""

from __future__ import annotations

import sys

import click

from lxd_image_server.cli.common import F
from lxd_image_server.ops.import_naming import Naming
from lxd_image_server.progress import ProgressStart, TerminalProgress


def terminal_progress(label: str) -> ProgressStart | None:
    return TerminalProgress(sys.stderr, label) if sys.stderr.isatty() else None


def naming_options(f: F) -> F:
    """--os/--release/--arch/--variant/--serial: what metadata.yaml would otherwise say."""
    f = click.option(
        "--serial", help="Version key YYYYMMDD_HH:MM [default: metadata's creation_date, UTC]."
    )(f)
    f = click.option(
        "--variant", help="Variant [default: metadata's properties.variant, else 'default']."
    )(f)
    f = click.option(
        "--arch",
        help="Architecture, kernel or Debian name [default: metadata's architecture].",
    )(f)
    f = click.option("--release", help="Release [default: metadata's properties.release].")(f)
    f = click.option("--os", "os_name", help="OS name [default: metadata's properties.os].")(f)
    return f


def naming(
    os_name: str | None,
    release: str | None,
    arch: str | None,
    variant: str | None,
    serial: str | None,
) -> Naming:
    return Naming(os=os_name, release=release, arch=arch, variant=variant, serial=serial)


def files_given(files: tuple[str, ...]) -> tuple[str, ...]:
    if len(files) > 2:
        raise click.UsageError(
            "give one unified tarball, or a metadata tarball and a root filesystem "
            f"({len(files)} files given)"
        )
    return files
