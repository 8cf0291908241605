"""Basic credentials, checked by the upload app itself against the htpasswd file nginx uses.

nginx checks them too, but the app's socket can be reached without nginx (by any process in
the socket's group), so the app does not trust a proxy header. The file is parsed again only
when it changes (device, inode, size, mtime), and a password that matched is remembered (as
an HMAC with a per-process key) until the file changes, so a request costs one stat() and no
SHA-crypt rounds once a client is known. An unknown user costs as much as a wrong password.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
import threading

from lxd_image_server import htpasswd

log = logging.getLogger(__name__)

#: Longer Authorization headers and passwords are refused without hashing (SHA-crypt's cost
#: grows with the password's length).
MAX_HEADER = 4096
MAX_PASSWORD = 1024
#: Remembered matches, at most (the memory is cleared when full).
MAX_REMEMBERED = 256
REALM = "lxd-image-server"
_DUMMY_HASH = htpasswd.hash_password(secrets.token_urlsafe(12), salt="lxdimageserver00")


class CredentialsUnavailable(Exception):
    """The password file exists but cannot be read (a server problem, not the client's)."""


class Credentials:
    """Users and password hashes of one htpasswd file, reloaded when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._key = secrets.token_bytes(32)
        self._known: set[bytes] = set()

    def _current(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                self._stamp, self._users = None, {}
                self._known.clear()
            return {}
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp == self._stamp:
                return self._users
        try:
            users = htpasswd.read_users(self.path)
        except (OSError, UnicodeError) as e:
            raise CredentialsUnavailable(f"cannot read {self.path}: {e}") from None
        with self._lock:
            self._stamp, self._users = stamp, users
            self._known.clear()
        return users

    def user_of(self, authorization: str | None) -> str | None:
        """The user whose Basic credentials these are, or None (absent, malformed or wrong).

        Raises CredentialsUnavailable when the password file cannot be read.
        """
        users = self._current()
        parsed = _parse_basic(authorization)
        if parsed is None:
            return None
        user, password = parsed
        hashed = users.get(user)
        mark = hmac.new(
            self._key, b"\0".join((user.encode(), (hashed or "").encode(), password)), "sha256"
        ).digest()
        with self._lock:
            if hashed is not None and mark in self._known:
                return user
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        # The same work for an unknown user and a bad password: only the result differs.
        ok = htpasswd.verify_password(text or "", hashed if hashed is not None else _DUMMY_HASH)
        if not (ok and hashed is not None and text is not None):
            return None
        with self._lock:
            if len(self._known) >= MAX_REMEMBERED:
                self._known.clear()
            self._known.add(mark)
        return user


def _parse_basic(header: str | None) -> tuple[str, bytes] | None:
    if not header or len(header) > MAX_HEADER:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    user_bytes, sep, password = raw.partition(b":")
    if not sep or not user_bytes or len(password) > MAX_PASSWORD:
        return None
    try:
        user = user_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user, password


def challenge() -> tuple[tuple[str, str], ...]:
    """The WWW-Authenticate header of a 401."""
    return (("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),)
