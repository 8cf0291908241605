"""The password file nginx reads for `auth_basic_user_file`, and the hashes in it.

nginx hands each stored hash to the C library's crypt(), so on Debian it understands SHA-512
crypt (`$6$`), SHA-256 crypt (`$5$`), MD5 crypt (`$1$`, `$apr1$`, which nginx computes itself)
and `{SHA}`. New passwords are always hashed with SHA-512 crypt, implemented here from Ulrich
Drepper's specification "Unix crypt using SHA-256 and SHA-512" with hashlib: the `crypt`
module is deprecated (and gone in Python 3.13) and passlib is not needed for one algorithm.

File format, one user per line: `name:hash[:comment]`; lines starting with `#` and blank lines
are ignored by nginx, and the first line naming a user wins.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import logging
import os
import re
import secrets

from lxd_image_server.fsutil import fsync_dir, write_atomic

log = logging.getLogger(__name__)

#: The alphabet of crypt's base-64 encoding, and of its salts.
CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

SALT_LENGTH = 16  # the most SHA-crypt uses
ROUNDS_DEFAULT = 5000
ROUNDS_MIN = 1000
ROUNDS_MAX = 999_999_999
FILE_MODE = 0o640

_SHA_CRYPT_SETTING = re.compile(r"^\$(?P<id>[56])\$(?:rounds=(?P<rounds>[0-9]+)\$)?(?P<salt>[^$]*)")

# Order in which the digest's bytes are taken, three at a time, for the final encoding (the
# tables of the specification); the leftover bytes are encoded by the caller.
_SHA256_ORDER = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
    (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29),
)  # fmt: skip
_SHA512_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
    (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54),
    (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60),
    (40, 61, 19), (62, 20, 41),
)  # fmt: skip
_MD5_ORDER = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5))


def _b64_24bit(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(CRYPT_ALPHABET[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat_to(block: bytes, length: int) -> bytes:
    """`block` repeated and cut to `length` bytes (the spec's P and S sequences)."""
    whole, rest = divmod(length, len(block))
    return block * whole + block[:rest]


def _sha_crypt_digest(algorithm: str, password: bytes, salt: bytes, rounds: int) -> bytes:
    # Steps 4-8: digest B = H(password, salt, password).
    b = hashlib.new(algorithm)
    b.update(password + salt + password)
    digest_b = b.digest()

    # Steps 1-3 and 9-12: digest A.
    a = hashlib.new(algorithm)
    a.update(password + salt)
    a.update(_repeat_to(digest_b, len(password)))
    length = len(password)
    while length:
        a.update(digest_b if length & 1 else password)
        length >>= 1
    digest_a = a.digest()

    # Steps 13-16: the P sequence, from digest DP = H(password repeated len(password) times).
    dp = hashlib.new(algorithm)
    for _ in range(len(password)):
        dp.update(password)
    p_seq = _repeat_to(dp.digest(), len(password)) if password else b""

    # Steps 17-20: the S sequence, from digest DS = H(salt repeated 16 + A[0] times).
    ds = hashlib.new(algorithm)
    for _ in range(16 + digest_a[0]):
        ds.update(salt)
    s_seq = _repeat_to(ds.digest(), len(salt)) if salt else b""

    # Step 21: the rounds.
    c = digest_a
    for i in range(rounds):
        h = hashlib.new(algorithm)
        h.update(p_seq if i & 1 else c)
        if i % 3:
            h.update(s_seq)
        if i % 7:
            h.update(p_seq)
        h.update(c if i & 1 else p_seq)
        c = h.digest()
    return c


def sha_crypt(password: str | bytes, setting: str) -> str:
    """crypt(3) for `$5$` and `$6$` settings, with the C library's handling of the setting.

    `setting` is `$6$[rounds=N$]salt[$...]` (a full hash works too: everything after the salt
    is ignored). The salt is cut to 16 characters; rounds are clamped to 1000..999999999 and
    are written into the result whenever the setting names them, as glibc does.
    """
    match = _SHA_CRYPT_SETTING.match(setting)
    if match is None:
        raise ValueError(f"not a SHA-crypt setting: {setting!r}")
    pw = password.encode() if isinstance(password, str) else password
    salt = match["salt"][:SALT_LENGTH]
    custom = match["rounds"] is not None
    rounds = min(max(int(match["rounds"]), ROUNDS_MIN), ROUNDS_MAX) if custom else ROUNDS_DEFAULT
    sha512 = match["id"] == "6"
    d = _sha_crypt_digest("sha512" if sha512 else "sha256", pw, salt.encode(), rounds)
    order = _SHA512_ORDER if sha512 else _SHA256_ORDER
    encoded = "".join(_b64_24bit(d[x], d[y], d[z], 4) for x, y, z in order)
    if sha512:
        encoded += _b64_24bit(0, 0, d[63], 2)
    else:
        encoded += _b64_24bit(0, d[31], d[30], 3)
    prefix = f"${match['id']}$" + (f"rounds={rounds}$" if custom else "")
    return f"{prefix}{salt}${encoded}"


def md5_crypt(password: str | bytes, setting: str) -> str:
    """MD5 crypt, for `$1$` and Apache's `$apr1$` (same algorithm, different magic)."""
    for magic in ("$apr1$", "$1$"):
        if setting.startswith(magic):
            break
    else:
        raise ValueError(f"not an MD5-crypt setting: {setting!r}")
    pw = password.encode() if isinstance(password, str) else password
    salt = setting[len(magic) :].split("$", 1)[0][:8].encode()

    alt = hashlib.md5(pw + salt + pw).digest()
    ctx = hashlib.md5(pw + magic.encode() + salt)
    ctx.update(_repeat_to(alt, len(pw)) if pw else b"")
    length = len(pw)
    while length:
        ctx.update(b"\0" if length & 1 else pw[:1])
        length >>= 1
    final = ctx.digest()
    for i in range(1000):
        h = hashlib.md5()
        h.update(pw if i & 1 else final)
        if i % 3:
            h.update(salt)
        if i % 7:
            h.update(pw)
        h.update(final if i & 1 else pw)
        final = h.digest()
    f = final
    encoded = "".join(_b64_24bit(f[x], f[y], f[z], 4) for x, y, z in _MD5_ORDER) + _b64_24bit(
        0, 0, f[11], 2
    )
    return f"{magic}{salt.decode()}${encoded}"


def _check_salt(salt: str) -> None:
    if len(salt) > SALT_LENGTH:
        raise ValueError(f"salt too long: at most {SALT_LENGTH} characters")
    bad = sorted({ch for ch in salt if ch not in CRYPT_ALPHABET})
    if bad:
        raise ValueError(f"salt may only use [./0-9A-Za-z], not {''.join(bad)!r}")


def hash_password(password: str, salt: str | None = None) -> str:
    """SHA-512 crypt (`$6$`, 5000 rounds) of `password`, with a random 16-character salt."""
    if salt is None:
        salt = "".join(secrets.choice(CRYPT_ALPHABET) for _ in range(SALT_LENGTH))
    else:
        _check_salt(salt)
    return sha_crypt(password, f"$6${salt}")


def verify_password(password: str, hashed: str) -> bool:
    """True if `password` matches `hashed` ($6$, $5$, $apr1$, $1$ or {SHA}); False otherwise.

    An unknown or malformed hash never matches. The comparison is constant-time.
    """
    try:
        if hashed.startswith(("$6$", "$5$")):
            computed = sha_crypt(password, hashed)
        elif hashed.startswith(("$apr1$", "$1$")):
            computed = md5_crypt(password, hashed)
        elif hashed.startswith("{SHA}"):
            computed = "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
        else:
            log.debug("unsupported password hash scheme: %.8s...", hashed)
            return False
    except ValueError:
        return False
    return hmac.compare_digest(computed.encode(), hashed.encode(errors="surrogateescape"))


def generate_password() -> str:
    """A random password: 24 URL-safe characters (144 bits)."""
    return secrets.token_urlsafe(18)


def validate_user(name: str) -> None:
    """Raises ValueError unless `name` can be a user name in the password file."""
    if not name:
        raise ValueError("user name must not be empty")
    if ":" in name:
        raise ValueError(f"user name {name!r} must not contain ':'")
    if any(ch.isspace() for ch in name):
        raise ValueError(f"user name {name!r} must not contain whitespace")
    if any(not ch.isprintable() for ch in name):
        raise ValueError(f"user name {name!r} must not contain control characters")
    if name.startswith("#"):
        raise ValueError(f"user name {name!r} must not start with '#' (nginx reads a comment)")


def _user_of(line: str) -> str | None:
    """The user a line defines, or None for blank lines and comments."""
    if not line.strip() or line.startswith("#"):
        return None
    return line.split(":", 1)[0]


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def read_users(path: str) -> dict[str, str]:
    """{user: hash} from the password file; an absent file has no users.

    As in nginx, the first line naming a user wins, and a comment after the hash is dropped.
    """
    users: dict[str, str] = {}
    for line in _read_lines(path):
        user = _user_of(line)
        if user is None or user in users:
            continue
        fields = line.split(":", 2)
        users[user] = fields[1] if len(fields) > 1 else ""
    return users


def set_password(path: str, user: str, password: str, group: str | int | None = None) -> bool:
    """Adds `user` or replaces its password; returns True if the user is new.

    Other lines keep their content and order (a comment field after the user's old hash is
    kept too; later, dead, lines for the same user are dropped). The file is replaced
    atomically with mode 0640, keeping the owner and group of the file it replaces; `group`
    (a name or gid) sets the group instead, e.g. the one nginx's workers run as.
    """
    validate_user(user)
    path = os.path.realpath(path)
    hashed = hash_password(password)
    lines = _read_lines(path)
    out: list[str] = []
    found = False
    for line in lines:
        if _user_of(line) != user:
            out.append(line)
        elif not found:
            found = True
            fields = line.split(":", 2)
            out.append(":".join([user, hashed, *fields[2:]]))
        else:
            log.info("dropping a later duplicate line for user %s in %s", user, path)
    if not found:
        out.append(f"{user}:{hashed}")
    _replace(path, out, group)
    log.info("%s user %s in %s", "added" if not found else "updated", user, path)
    return not found


def remove_user(path: str, user: str) -> bool:
    """Removes every line of `user` (its credentials stop working at the next request: nginx
    and the upload app read the file again when it changes); returns False when it had none.
    The file is replaced as set_password replaces it (mode 0640, owner and group kept)."""
    validate_user(user)
    path = os.path.realpath(path)
    lines = _read_lines(path)
    out = [line for line in lines if _user_of(line) != user]
    if len(out) == len(lines):
        return False
    _replace(path, out, None)
    log.info("removed user %s from %s", user, path)
    return True


def _replace(path: str, lines: list[str], group: str | int | None) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8", errors="surrogateescape")
    try:
        st = os.stat(path)
        uid, gid = st.st_uid, st.st_gid
    except FileNotFoundError:
        uid, gid = -1, -1
    if isinstance(group, int):
        gid = group
    elif group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group: {group!r}") from None
    if (uid, gid) == (os.geteuid(), os.getegid()):
        uid = gid = -1
    write_atomic(path, data, FILE_MODE, uid, gid)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
