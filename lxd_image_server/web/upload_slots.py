"""How many uploads one credential may have in progress at once (issue 18).

A stalled upload holds one of the app's threads until its read timeout; the limit keeps one
credential (a stuck CI job, a stolen password) from taking them all, while one credential
may still run `upload.max_parallel` (default 8) uploads in parallel. Anonymous uploads (only
when allowed) are counted per client address, the one nginx saw (X-Real-IP, which nginx sets
itself).

The count spans the app's worker processes: each upload in progress holds an flock on one of
the key's slot files, `<dir>/<sha256 of the key>.<n>` (empty files, made on first use); the
kernel drops the lock when the upload ends or its process dies, so a crash never leaks a slot.
Without a directory (none configured) the count is per process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator

from lxd_image_server.web.upload_errors import HTTPError

log = logging.getLogger(__name__)

#: seconds a client refused for too many uploads is asked to wait (`curl --retry` honours it)
RETRY_AFTER = 5


class UploadSlots:
    def __init__(self, directory: str | None, per_key: int) -> None:
        if per_key < 1:
            raise ValueError("per_key must be at least 1")
        self.per_key = per_key
        self.directory = directory
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def _refuse(self, key: str) -> HTTPError:
        who = key.split(":", 1)[0]
        return HTTPError(
            429,
            f"at most {self.per_key} uploads at once per {who}; retry in {RETRY_AFTER} s",
            headers=(("Retry-After", str(RETRY_AFTER)),),
        )

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """One slot of `key` ("user:NAME" or "address:ADDR") while the block runs; HTTPError
        429 with Retry-After when all are taken."""
        if self.directory is None:
            with self._counted(key):
                yield
            return
        fd = self._take_file_slot(key)
        try:
            yield
        finally:
            os.close(fd)  # the lock goes with the last descriptor

    @contextlib.contextmanager
    def _counted(self, key: str) -> Iterator[None]:
        with self._lock:
            n = self._counts.get(key, 0)
            if n >= self.per_key:
                raise self._refuse(key)
            self._counts[key] = n + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._counts[key] - 1
                if left:
                    self._counts[key] = left
                else:
                    del self._counts[key]

    def _take_file_slot(self, key: str) -> int:
        assert self.directory is not None
        stem = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for n in range(self.per_key):
            try:
                fd = os.open(os.path.join(self.directory, f"{stem}.{n}"), flags, 0o600)
            except OSError as e:
                # the directory is gone or not usable: refuse, and say why in the log
                log.error("upload slots in %s: %s", self.directory, e.strerror or e)
                raise HTTPError(500, "upload slots unavailable; see the server log") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            return fd
        raise self._refuse(key)
