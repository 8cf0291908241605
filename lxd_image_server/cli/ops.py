"""The operator commands: import, list, verify, prune, remove. Options in, calls out.

root.py loads them by name when one is used (LazyGroup); what they share with root.py comes
from common.py, with the one map from errors to exit codes. Commands that change the tree
hand the publish to the running watcher when there is one (catalog/publish_requests.py), else
publish the result themselves (updating.with_pipeline), under the catalog lock.
Exit codes: 0 done, 1 failed (or `verify` found problems), 2 usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from lxd_image_server.cli.common import Globals, handle_errors, tree_options, tree_paths
from lxd_image_server.cli.naming import naming, naming_options, terminal_progress
from lxd_image_server.config import Paths
from lxd_image_server.progress import for_terminal

if TYPE_CHECKING:
    from lxd_image_server.catalog.pipeline import Pipeline
    from lxd_image_server.ops import pruning

# (what only some commands use is imported in them: `import` handed to a running watcher
# never loads the pipeline nor the catalog's model, and each image imported pays for its
# start-up)

#: `list --format`: ops/listing.py FORMATS (the same tuple: tests/unit/test_cli_ops.py)
LIST_FORMATS = ("table", "json", "csv")

T = TypeVar("T")


def _with_pipeline(
    g: Globals, paths: Paths, run: Callable[[Pipeline], T], cache_first: Any = None
) -> T:
    from lxd_image_server.ops.updating import with_pipeline
    from lxd_image_server.privileges import become_writer

    become_writer(paths)  # as root on the package's tree: as its catalog writer
    return with_pipeline(paths, g.settings, run, for_terminal(), cache_first)


# -- import ---------------------------------------------------------------------------------


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@tree_options
@naming_options
@click.option("--move", is_flag=True, help="Move the files instead of copying (same file system).")
@click.option("--force", is_flag=True, help="Replace the files of an existing version.")
@click.pass_obj
@handle_errors
def import_cmd(
    g: Globals,
    files: tuple[str, ...],
    root_dir: str | None,
    img_dir: str | None,
    streams_dir: str | None,
    os_name: str | None,
    release: str | None,
    arch: str | None,
    variant: str | None,
    serial: str | None,
    move: bool,
    force: bool,
) -> None:
    """Put what `lxc image export` wrote into the tree and publish it.

    FILE is a unified tarball (<fingerprint>.tar.gz), or FILE FILE a split image: the metadata
    tarball (meta-<fingerprint>.tar.xz) and the root filesystem (.squashfs, .tar.xz or .qcow2),
    in any order. Several images at once (published once): a directory of exports, or three
    files or more; a split image's files are then paired by lxc's names (meta-NAME.tar.xz with
    NAME.squashfs, NAME.tar.xz or NAME.qcow2). Naming options not given are read from
    metadata.yaml.
    """
    from lxd_image_server.ops import import_batch, import_detect, importing

    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    plans = importing.plan_all(
        import_batch.group_files(files), naming(os_name, release, arch, variant, serial)
    )
    result = importing.import_images(
        paths,
        g.settings,
        plans,
        move=move,
        force=force,
        progress_start=terminal_progress("copying"),
        publish_progress=for_terminal(),
    )
    problems = []
    for plan, placed in result.placed:
        what = import_detect.describe(plan)
        click.echo(f"imported {what} into {placed.version_dir}")
        click.echo(f"  files: {', '.join(sorted(placed.files))}; fingerprint {placed.fingerprint}")
        why = result.missing.get(plan.key.relpath)
        if why is not None:
            problems.append(f"{what} is in the tree but not in the catalog: {why}")
    for plan, why in result.failed:
        problems.append(f"{import_detect.describe(plan)} not imported: {why}")
    if result.placed and len(result.missing) < len(result.placed):
        by = " by the running watcher" if result.by_watcher else ""
        click.echo(f"  published in {paths.streams_dir}{by}")
    if problems:
        raise click.ClickException("\n".join(problems))


# -- list / verify --------------------------------------------------------------------------


@click.command("list")
@tree_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(LIST_FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.pass_obj
@handle_errors
def list_cmd(
    g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None, fmt: str
) -> None:
    """List the published images: product, version, type, size, fingerprint, aliases."""
    from lxd_image_server.ops import listing

    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    rows = listing.image_rows(listing.read_catalog(paths.streams_dir))
    click.echo(listing.render(rows, fmt), nl=False)


@click.command("verify")
@tree_options
@click.option(
    "--quick",
    is_flag=True,
    help="Check the rules and every file's size and type, without reading the files' bytes "
    "(no sha256, no fingerprint).",
)
@click.pass_obj
@handle_errors
def verify_cmd(
    g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None, quick: bool
) -> None:
    """Hold the catalog to every client's rules and rehash every published file (exit 1 on
    any problem)."""
    from lxd_image_server.ops import listing
    from lxd_image_server.ops.verify import read_index_problems, verify

    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    catalog = listing.read_catalog(paths.streams_dir)
    report = verify(
        paths.root_dir,
        catalog,
        progress_start=None if quick else terminal_progress("verifying"),
        full=not quick,
    )
    problems = read_index_problems(paths.streams_dir, catalog) + report.problems
    for problem in problems:
        click.echo(str(problem))
    if problems:
        click.echo(f"{len(problems)} problem(s); {report.summary()}")
        sys.exit(1)
    click.echo(f"ok: {report.summary()}")


# -- prune / remove -------------------------------------------------------------------------


def _report(outcome: pruning.Outcome, dry_run: bool, nothing: str) -> None:
    from lxd_image_server.catalog import retention

    if dry_run:
        for product, serial in outcome.would:
            click.echo(f"would remove {product} {serial}")
        if not outcome.would:
            click.echo(nothing)
        return
    deleted = {p.path for p in outcome.deleted}
    for p in outcome.scheduled:
        if p.path in deleted:
            click.echo(f"removed {p.product} {p.serial} (files deleted: no grace period)")
        else:
            click.echo(
                f"removed {p.product} {p.serial} from the catalog; its files stay until "
                f"{retention.utc_text(p.expires)} (the first `update` after that deletes them)"
            )
    for p in outcome.already:
        if p.path not in deleted:
            click.echo(
                f"{p.product} {p.serial} was already out of the catalog; its files stay until "
                f"{retention.utc_text(p.expires)}"
            )
    if outcome.by_watcher:
        click.echo("published by the running watcher")
    scheduled = {p.path for p in outcome.scheduled}
    for p in outcome.deleted:
        if p.path not in scheduled:
            click.echo(f"deleted the files of {p.product} {p.serial} (grace period over)")
    if not outcome.scheduled and not outcome.already:
        click.echo(nothing)


@click.command("prune")
@tree_options
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    required=True,
    metavar="N",
    help="Versions to keep of each product (the newest).",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.pass_obj
@handle_errors
def prune_cmd(
    g: Globals,
    root_dir: str | None,
    img_dir: str | None,
    streams_dir: str | None,
    keep: int,
    dry_run: bool,
) -> None:
    """Keep the newest N versions of each product; the others leave the catalog now and
    their files are deleted after the grace period ([prune] grace_period)."""
    from lxd_image_server.ops import pruning
    from lxd_image_server.privileges import become_writer

    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    grace = g.settings.prune_grace
    become_writer(paths)  # as root on the package's tree: as its catalog writer
    # with a watcher running on the tree, chosen from what it published and published by it
    outcome = pruning.prune_by_watcher(
        paths,
        keep,
        grace,
        lambda: _with_pipeline(g, paths, lambda p: p.update_all()),
        dry_run=dry_run,
    )
    if outcome is None:
        outcome = _with_pipeline(g, paths, lambda p: pruning.prune(p, keep, grace, dry_run=dry_run))
    _report(outcome, dry_run, f"nothing to prune: no product has more than {keep} version(s)")


@click.command("remove")
@click.argument("product")
@click.argument("serial", required=False)
@tree_options
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.pass_obj
@handle_errors
def remove_cmd(
    g: Globals,
    product: str,
    serial: str | None,
    root_dir: str | None,
    img_dir: str | None,
    streams_dir: str | None,
    dry_run: bool,
) -> None:
    """Remove PRODUCT (os:release:arch:variant, every version) or its version SERIAL: out of
    the catalog now, files deleted after the grace period ([prune] grace_period)."""
    from lxd_image_server.catalog import retention
    from lxd_image_server.ops import pruning

    try:
        retention.parse_product(product)
    except retention.RetentionError as e:
        raise click.BadParameter(str(e), param_hint="PRODUCT") from e
    from lxd_image_server.privileges import become_writer

    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    grace = g.settings.prune_grace
    become_writer(paths)  # as root on the package's tree: as its catalog writer
    # with a watcher running on the tree, the publish is its own (only the product scanned)
    outcome = pruning.remove_by_watcher(
        paths,
        product,
        serial,
        grace,
        lambda: _with_pipeline(g, paths, lambda p: p.update_all()),
        dry_run=dry_run,
    )
    if outcome is None:
        outcome = _with_pipeline(
            g, paths, lambda p: pruning.remove(p, product, serial, grace, dry_run=dry_run)
        )
    _report(outcome, dry_run, "nothing to remove")
