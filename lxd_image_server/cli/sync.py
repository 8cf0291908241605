"""`sync`: a chosen set of an upstream simplestreams remote's images brought into the tree and
published (a module of its own: it loads the HTTPS client that the other commands do not)."""

from __future__ import annotations

import signal
import threading

import click

from lxd_image_server import settings as settings_module
from lxd_image_server.cli.common import Globals, handle_errors, tree_options, tree_paths
from lxd_image_server.cli.naming import terminal_progress
from lxd_image_server.config import ConfigError, Paths
from lxd_image_server.ops import sync_fetch, syncing
from lxd_image_server.ops.sync_select import FILTER_KEYS, FilterError, parse_filters
from lxd_image_server.progress import human
from lxd_image_server.settings import Settings


@click.command("sync")
@click.argument("url", metavar="[URL]", required=False)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help=f"Take only products whose KEY ({', '.join(FILTER_KEYS)}) matches VALUE (a shell "
    "pattern, any case; type is container or vm). Several keys: all must match; one key "
    "twice: either value.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    metavar="N",
    help="The newest N versions of each product [default: 1].",
)
@tree_options
@click.option("--dry-run", is_flag=True, help="Only say what would be downloaded.")
@click.option(
    "--ca",
    "cafile",
    type=click.Path(exists=True, dir_okay=False),
    help="Trust only the CA certificates in this PEM file [default: the system store].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=sync_fetch.DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="A connection or read that waits longer fails its file.",
)
@click.option(
    "--due",
    is_flag=True,
    help="Without URL: only the configured syncs whose interval has passed (the timer's).",
)
@click.option(
    "--repeat",
    is_flag=True,
    help="Without URL: run the configured syncs on their schedule until stopped (`run`'s).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1, max=32),
    default=syncing.DEFAULT_JOBS,
    show_default=True,
    help="Versions downloaded at once.",
)
@click.pass_obj
@handle_errors
def sync_cmd(
    g: Globals,
    url: str | None,
    filters: tuple[str, ...],
    keep: int | None,
    root_dir: str | None,
    img_dir: str | None,
    streams_dir: str | None,
    dry_run: bool,
    cafile: str | None,
    timeout: float,
    due: bool,
    repeat: bool,
    jobs: int,
) -> None:
    """Bring the newest versions of an upstream simplestreams remote's images into the tree
    and publish them.

    URL is the remote (https://[USER:PASSWORD@]HOST[:PORT][/PATH], as given to
    `lxc remote add`). Every file is checked against the upstream's size and sha256, and each
    image's fingerprint against its bytes, before its version is placed, whole; a version
    that fails is reported in one line and the others still land. Exit 1 when any failed.

    Without URL: the syncs of the configuration ([sync.NAME]), each with its own url,
    filters, keep, interval, ca and timeout.
    """
    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    if url is None:
        given = [o for o, v in (("--filter", filters), ("--keep", keep), ("--ca", cafile)) if v]
        given += ["--dry-run"] if dry_run else []
        if given:
            raise click.UsageError(f"{', '.join(given)} only go with a URL")
        _configured(g, paths, due, repeat)
        return
    if due or repeat:
        raise click.UsageError("--due and --repeat are for the configured syncs (no URL)")
    try:
        chosen = parse_filters(filters)
    except FilterError as e:
        raise click.BadParameter(str(e), param_hint="--filter") from e
    request = syncing.SyncRequest(url, chosen, keep or 1, cafile, timeout, jobs, dry_run)
    result = syncing.sync(request, paths, g.settings, terminal_progress("downloading"))
    _report(result, dry_run)
    if result.failed:
        raise click.ClickException(
            f"{len(result.failed)} version(s) of {result.upstream} not synced (see above)"
        )


def _configured(g: Globals, paths: Paths, due: bool, repeat: bool) -> None:
    from lxd_image_server.ops import sync_schedule

    if not g.settings.syncs and due:
        click.echo("no [sync.NAME] configured: nothing to do")
        return
    if not g.settings.syncs:
        raise click.UsageError(
            "no URL given and no [sync.NAME] in the configuration "
            f"({', '.join(g.settings.sources) or 'no configuration file read'})"
        )
    if repeat:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        last = [g.settings]

        def reload() -> Settings:
            try:
                last[0] = settings_module.load(g.config)
            except ConfigError as e:
                click.echo(f"configuration not reloaded: {e}", err=True)
            return last[0]

        sync_schedule.repeat(paths, reload, stop)
        return
    outcomes = sync_schedule.run_configured(
        paths, g.settings, only_due=due, progress_start=terminal_progress("downloading")
    )
    for o in outcomes:
        if o.result is not None:
            click.echo(f"[{o.name}]")
            _report(o.result, False)
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        raise click.ClickException(f"sync(s) {', '.join(failed)} did not go through (see above)")
    if not outcomes:
        click.echo("no configured sync is due")


def _report(result: syncing.SyncResult, dry_run: bool) -> None:
    missing = result.missing
    if dry_run:
        for plan in missing:
            click.echo(f"would download {plan.label} as {plan.key.relpath} ({human(plan.size)})")
        for plan in result.present:
            click.echo(f"have {plan.label} ({plan.key.relpath})")
        click.echo(
            f"{len(missing)} version(s) to download ({human(sum(p.size for p in missing))}), "
            f"{len(result.present)} held already"
        )
        return
    for landed in result.landed:
        click.echo(f"synced {landed.plan.label} into images/{landed.plan.key.relpath}")
    if not missing:
        click.echo(
            f"nothing new at {result.upstream}: {len(result.present)} version(s) held already"
        )
    elif result.published:
        click.echo(f"published {len(result.landed)} new version(s)")
    for product, serial in result.retired:
        click.echo(f"{product} {serial}: no longer among upstream's newest; out of the catalog")
