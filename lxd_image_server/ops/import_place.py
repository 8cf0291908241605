"""`import`: an import plan (import_detect.py) carried out: its files placed into the image
tree, atomically.

The files are copied (or moved) into a hidden temporary directory inside the variant directory,
fsynced, and the whole version directory is renamed into place, so the watcher never sees half
of an image. Copying also hashes (import_copy.py: one pass, the bytes that landed): the
fingerprint in lxc's file names is checked, and the digests go into the hash cache so publishing
does not read the files again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lxd_image_server.fsutil import DirChain, make_hidden_dir, open_dir, open_regular
from lxd_image_server.ops import import_copy
from lxd_image_server.ops.import_detect import ImagePlan, Source, open_source
from lxd_image_server.ops.import_errors import ImportFailed, VersionExists
from lxd_image_server.progress import Progress, no_progress
from lxd_image_server.tree.layout import Role, VersionKey, classify

if TYPE_CHECKING:
    from lxd_image_server.catalog.hashcache import HashCache
    from lxd_image_server.catalog.hashread import Hasher
    from lxd_image_server.ops.import_early import Copied, EarlyRoot

log = logging.getLogger(__name__)

DIR_MODE = 0o755
FILE_MODE = 0o644


@dataclass
class Placed:
    key: VersionKey
    version_dir: str
    #: name in the version directory -> (size, sha256)
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: the image's fingerprint as clients see it (combined for split images)
    fingerprint: str = ""
    replaced: bool = False
    moved: list[str] = field(default_factory=list)


def _dir_mode(img_fd: int) -> int:
    """The mode of the directories an import makes: group-writable when images/ is (the
    package's tree: setgid lxdadm, 2775, so that the catalog writer, a member of the group,
    deletes what retention and prune let go, as it does an upload's), else DIR_MODE."""
    return DIR_MODE | (os.fstat(img_fd).st_mode & stat.S_IWGRP)


def _not_a_directory(path: str) -> ImportFailed:
    return ImportFailed(
        f"{path} exists and is not a directory (or is a symbolic link, never followed)"
    )


def _open_dir(name: str, dir_fd: int, path: str) -> int:
    try:
        return open_dir(name, dir_fd=dir_fd)
    except NotADirectoryError:
        raise _not_a_directory(path) from None


_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Transfer:
    """Brings the plan's files to temporary names in one directory (a descriptor: nothing is
    resolved by path inside images/ again); undoes itself on failure."""

    def __init__(
        self, plan: ImagePlan, move: bool, progress: Progress, early: EarlyRoot | None = None
    ) -> None:
        self.plan = plan
        self.move = move
        self.progress = progress
        #: the root's copy started with the command (import_early.py), if any
        self.early = early
        self.dir_fd = -1
        #: temporary name -> the source it was moved from (to move back on failure)
        self.moved_from: dict[str, str] = {}
        self.created: list[str] = []
        self.copied_instead: list[str] = []

    def bring(self, src: Source, tmp: str, sinks: Sequence[Hasher]) -> int:
        if self.move:
            try:
                os.rename(src.path, tmp, dst_dir_fd=self.dir_fd)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise ImportFailed(f"cannot move {src.path}: {e.strerror or e}") from e
                log.info("%s is on another file system: copying it instead", src.path)
                self.copied_instead.append(src.path)
            else:
                self.moved_from[tmp] = src.path
                fd = open_regular(tmp, dir_fd=self.dir_fd)
                try:
                    os.fchmod(fd, FILE_MODE)
                    size = import_copy.feed(fd, sinks, self.progress)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return size
        self.created.append(tmp)
        fin = open_source(src.path)
        try:
            out = os.open(tmp, _CREATE, FILE_MODE, dir_fd=self.dir_fd)
            try:
                os.fchmod(out, FILE_MODE)
                size = import_copy.copy(fin, out, sinks, self.progress)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(fin)
        return size

    def take_early(self, src: Source, tmp: str, meta_sha256: str | None) -> Copied | None:
        """The root copied while the command started (import_early.py) as `tmp`, if it is
        this source's copy (`meta_sha256`: the digest of the metadata tarball placed before
        it, None for a unified tarball); None: `bring` it."""
        if self.early is None or self.move:
            return None
        copied = self.early.take(src.path, meta_sha256, self.dir_fd, tmp, self.progress)
        if copied is not None:
            self.created.append(tmp)
            log.debug("%s: its copy started with the command is used", src.path)
        else:
            log.debug("%s: copied now (%s)", src.path, self.early.reason or "not the early copy's")
        return copied

    def renamed(self, tmp: str, final: str, temporary: bool) -> None:
        """`tmp` is now `final`; still removed (or moved back) on failure if `temporary`."""
        if tmp in self.moved_from:
            self.moved_from[final] = self.moved_from.pop(tmp)
        if tmp in self.created:
            self.created.remove(tmp)
            if temporary:
                self.created.append(final)

    def done(self) -> list[str]:
        """The sources moved; nothing is undone any more."""
        moved = list(self.moved_from.values())
        self.moved_from.clear()
        self.created.clear()
        return moved

    def undo(self) -> None:
        for tmp, src in self.moved_from.items():
            with contextlib.suppress(OSError):
                os.rename(tmp, src, src_dir_fd=self.dir_fd)
        for tmp in self.created:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.dir_fd)
        self.moved_from.clear()
        self.created.clear()


def _check_fingerprint(plan: ImagePlan, fingerprint: str) -> None:
    if plan.export_fingerprint and plan.export_fingerprint != fingerprint:
        names = " and ".join(os.path.basename(s.path) for s in plan.sources)
        raise ImportFailed(
            f"{names}: the content does not match the fingerprint in the name "
            f"({plan.export_fingerprint[:12]}, content gives {fingerprint[:12]}): "
            "a damaged or altered export; nothing imported"
        )


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _walk_down(
    chain: DirChain, img_dir: str, components: Sequence[str], mode: int = DIR_MODE
) -> int:
    """Opens (making them, `mode`) `components` below images/ through `chain`, never through
    a link; the descriptor of the last one."""
    path = img_dir
    for component in components:
        path = os.path.join(path, component)
        try:
            chain.down(component, mode)
        except NotADirectoryError:
            raise _not_a_directory(path) from None
    return chain.fd


@contextlib.contextmanager
def staged(
    variant_fd: int,
    serial: str,
    version_dir: str,
    prefix: str,
    undo: Callable[[], None] | None = None,
    mode: int = DIR_MODE,
) -> Iterator[int]:
    """A new hidden directory (`prefix` + random, `mode`) in the variant directory, for the
    body of the block to fill (its descriptor); renamed to `serial` when the block ends
    normally, after an fsync of it: the version appears whole or not at all. Removed, with what
    is in it, when the block raises (or when `serial` appeared meanwhile: VersionExists), after
    `undo` (which may still take files out of it)."""
    tmp_name, fd = make_hidden_dir(variant_fd, prefix, mode)
    try:
        yield fd
        os.fsync(fd)
        if _exists(serial, variant_fd):
            raise VersionExists(f"{version_dir} appeared meanwhile; not replaced")
        os.rename(tmp_name, serial, src_dir_fd=variant_fd, dst_dir_fd=variant_fd)
    except BaseException:
        if undo is not None:
            undo()
        shutil.rmtree(tmp_name, dir_fd=variant_fd, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    os.fsync(variant_fd)


@contextlib.contextmanager
def new_version(img_dir: str, key: VersionKey, prefix: str) -> Iterator[int]:
    """`staged` for version `key` below `img_dir` (the directories on the way made, none
    followed if it is a link): VersionExists when it exists already, ImportFailed when the
    way down is blocked."""
    img_dir = os.path.abspath(img_dir)
    parts = key.relpath.split("/")
    version_dir = os.path.join(img_dir, key.relpath)
    with DirChain(os.open(img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as chain:
        # the directories above the version as the tree's (group-writable when images/ is:
        # the uploaders add versions there); the version itself its maker's alone (DIR_MODE:
        # the catalog writer, who also deletes it once pruned)
        variant_fd = _walk_down(chain, img_dir, parts[:-1], _dir_mode(chain.fd))
        if _exists(parts[-1], variant_fd):
            raise VersionExists(f"{version_dir} already exists")
        with staged(variant_fd, parts[-1], version_dir, prefix) as fd:
            yield fd


OnFilled = Callable[[int, "Placed"], None]


class Staged:
    """An image whose files are all in place, under a hidden name (`reveal` gives the version
    its name; `abort` takes it all back), or, replacing an existing version (--force), in
    place already."""

    def __init__(
        self, placed: Placed, chain: DirChain, transfer: _Transfer, tmp_name: str | None
    ) -> None:
        self.placed = placed
        self._chain = chain
        self._transfer = transfer
        #: the hidden directory in the variant directory (chain.fd); None: nothing to reveal
        self._tmp_name = tmp_name

    def reveal(self) -> Placed:
        """The version appears whole under its name (fsynced). VersionExists when it
        appeared meanwhile (then aborted)."""
        try:
            if self._tmp_name is not None:
                variant_fd, serial = self._chain.fd, self.placed.key.serial
                os.fsync(self._transfer.dir_fd)
                if _exists(serial, variant_fd):
                    raise VersionExists(
                        f"{self.placed.version_dir} appeared meanwhile; not replaced"
                    )
                os.rename(self._tmp_name, serial, src_dir_fd=variant_fd, dst_dir_fd=variant_fd)
                self._tmp_name = None
                os.fsync(variant_fd)
        except BaseException:
            self.abort()
            raise
        self.placed.moved = self._transfer.done()
        for src in self._transfer.copied_instead:
            log.info("%s was copied (another file system) and left where it was", src)
        self._close()
        return self.placed

    def abort(self) -> None:
        """Takes back what was staged (moved sources go back); nothing of it stays."""
        self._transfer.undo()
        if self._tmp_name is not None and self._chain.fd >= 0:
            shutil.rmtree(self._tmp_name, dir_fd=self._chain.fd, ignore_errors=True)
            self._tmp_name = None
        self._close()

    def _close(self) -> None:
        if self._transfer.dir_fd >= 0:
            os.close(self._transfer.dir_fd)
            self._transfer.dir_fd = -1
        self._chain.close()


def place(
    plan: ImagePlan,
    img_dir: str,
    move: bool = False,
    force: bool = False,
    progress_start: Callable[[int], Progress] | None = None,
    on_filled: OnFilled | None = None,
    early: EarlyRoot | None = None,
) -> Placed:
    """`stage`, then `reveal`: the image is in the tree when this returns."""
    return stage(plan, img_dir, move, force, progress_start, on_filled, early).reveal()


def stage(
    plan: ImagePlan,
    img_dir: str,
    move: bool = False,
    force: bool = False,
    progress_start: Callable[[int], Progress] | None = None,
    on_filled: OnFilled | None = None,
    early: EarlyRoot | None = None,
) -> Staged:
    """Puts the plan's files into images/<os>/<release>/<arch>/<variant>/<serial>/.

    New version: a hidden temporary directory in the variant directory, filled and fsynced
    here, renamed into place by `Staged.reveal` (so that several images appear together).
    Existing version (only with `force`): each file through a hidden temporary name, then the
    version's other image files are removed (metadata.json is kept), here.
    `on_filled(dir_fd, placed)` is called once every file has its final name in the directory
    `dir_fd`, before the version appears (import_handover.py: its digests handed over).
    `early`: the root's copy started with the command (import_early.py), used if it is this
    plan's root.

    Below images/ everything is done relative to directory descriptors opened without
    following links (the directories on the way made with fsutil.DirChain, 0755, or 0775 when
    images/ is group-writable: _dir_mode): a directory
    an uploader swapped for a symlink makes the import fail, it never leads outside images/.
    """
    key = plan.key
    img_dir = os.path.abspath(img_dir)
    parts = key.relpath.split("/")
    version_dir = os.path.join(img_dir, key.relpath)
    try:
        os.makedirs(img_dir, DIR_MODE, exist_ok=True)
        img_fd = os.open(img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImportFailed(f"cannot create {img_dir}: {e.strerror or e}") from e
    try:
        total = sum(os.path.getsize(s.path) for s in plan.sources)
    except OSError as e:
        os.close(img_fd)
        raise ImportFailed(f"cannot read {e.filename}: {e.strerror or e}") from e
    dir_mode = _dir_mode(img_fd)
    chain = DirChain(img_fd)
    transfer = _Transfer(plan, move, no_progress, early)
    tmp_name: str | None = None
    try:
        variant_fd = _walk_down(chain, img_dir, parts[:-1], dir_mode)
        exists = _exists(parts[-1], variant_fd)
        if exists and not force:
            raise VersionExists(f"{version_dir} already exists; --force replaces its files")
        transfer.progress = progress_start(total) if progress_start else no_progress
        placed = Placed(key=key, version_dir=version_dir, replaced=exists)
        if exists:
            transfer.dir_fd = _open_dir(parts[-1], variant_fd, version_dir)
            _fill(plan, transfer, placed, into_existing=True)
        else:
            tmp_name, transfer.dir_fd = make_hidden_dir(variant_fd, ".import-", dir_mode)
            _fill(plan, transfer, placed, into_existing=False)
        if on_filled is not None:
            on_filled(transfer.dir_fd, placed)
    except BaseException as e:
        transfer.undo()
        if tmp_name is not None:
            shutil.rmtree(tmp_name, dir_fd=chain.fd, ignore_errors=True)
        if transfer.dir_fd >= 0:
            os.close(transfer.dir_fd)
        chain.close()
        if isinstance(e, OSError):
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ImportFailed(f"no space left in {img_dir}; nothing imported") from e
            raise ImportFailed(f"importing into {version_dir} failed: {e.strerror or e}") from e
        raise
    return Staged(placed, chain, transfer, tmp_name)


def _fill(plan: ImagePlan, transfer: _Transfer, placed: Placed, into_existing: bool) -> None:
    """Brings every file of the plan into the transfer's directory under its final name."""
    directory = transfer.dir_fd
    staged: list[tuple[str, str]] = []  # (temporary name, final name)
    meta_hasher: Hasher | None = None
    try:
        for src in plan.sources:
            tmp = f".import-{secrets.token_hex(6)}.part"
            if src.role is Role.META:
                size, digest, meta_hasher = _bring_meta(transfer, src, tmp)
            else:
                size, digest, fingerprint = _bring_root(transfer, src, tmp, meta_hasher)
                placed.fingerprint = fingerprint
            name = src.target or f"{digest}.tar.gz"
            placed.files[name] = (size, digest)
            staged.append((tmp, name))
        _check_fingerprint(plan, placed.fingerprint)
    except BaseException:
        transfer.undo()
        raise
    # every file is complete: give them their names
    for tmp, name in staged:
        os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        transfer.renamed(tmp, name, temporary=not into_existing)
    if into_existing:
        for stale in _other_image_files(directory, {name for _, name in staged}):
            log.info(
                "removing %s (replaced by the import)", os.path.join(placed.version_dir, stale)
            )
            os.unlink(stale, dir_fd=directory)
        os.fsync(directory)


def _bring_meta(transfer: _Transfer, src: Source, tmp: str) -> tuple[int, str, Hasher]:
    """The metadata tarball as `tmp`: (size, sha256, its hasher: the fingerprint's start)."""
    plain = hashlib.sha256()
    size = transfer.bring(src, tmp, [plain])
    return size, plain.hexdigest(), plain


def _bring_root(
    transfer: _Transfer, src: Source, tmp: str, meta: Hasher | None
) -> tuple[int, str, str]:
    """A root (after its metadata tarball `meta`) or a unified tarball (`meta` None) as
    `tmp`: (size, sha256, the image's fingerprint)."""
    early = transfer.take_early(src, tmp, meta.hexdigest() if meta is not None else None)
    if early is not None:
        return early.size, early.sha256, early.combined or early.sha256
    plain = hashlib.sha256()
    sinks: list[Hasher] = [plain]
    combined: Hasher | None = None
    if meta is not None:
        combined = meta.copy()
        sinks.append(combined)
    size = transfer.bring(src, tmp, sinks)
    digest = plain.hexdigest()
    return size, digest, combined.hexdigest() if combined is not None else digest


def _other_image_files(dir_fd: int, keep: set[str]) -> Iterator[str]:
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        role = classify(entry.name)
        if (
            role is not None
            and role.role in (Role.META, Role.ROOT, Role.UNIFIED)
            and entry.name not in keep
            and entry.is_file(follow_symlinks=False)
        ):
            yield entry.name


def seed_cache(cache: HashCache, img_dir: str, placed: Placed) -> None:
    """Records the digests computed while copying, so publishing does not read the files again."""
    from lxd_image_server.tree.scan import Scanner

    versions = Scanner(img_dir).scan(placed.key.relpath)
    if not versions:
        return
    files = versions[0].files
    plain = [(files[n], sha) for n, (_, sha) in placed.files.items() if n in files]
    combined = []
    metas = [f for f in files.values() if f.role.role is Role.META and f.name in placed.files]
    roots = [f for f in files.values() if f.role.role is Role.ROOT and f.name in placed.files]
    if len(metas) == 1 and len(roots) == 1 and placed.fingerprint:
        combined.append((metas[0], roots[0], placed.fingerprint))
    cache.put_many(plain, combined)
