import base64
import ctypes
import ctypes.util
import grp
import hashlib
import os
import stat

import pytest

from lxd_image_server.htpasswd import (
    CRYPT_ALPHABET,
    generate_password,
    hash_password,
    md5_crypt,
    read_users,
    remove_user,
    set_password,
    sha_crypt,
    validate_user,
    verify_password,
)

pytestmark = pytest.mark.filterwarnings("error")

# The test vectors of Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512".
SPEC_SHA512 = [
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdF"
        "CoEOfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8v"
        "OuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1y"
        "xdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x"
        "9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "$6$rounds=77777$short",
        "we have a short salt string but not a short password",
        "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFm"
        "tlcGZelFl5CxtgfiAc0",
    ),
    (
        "$6$rounds=123456$asaltof16chars..",
        "a short string",
        "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULev"
        "oBK25fs2xXgMNrCzIMVcgEJAstJeonj1",
    ),
    (
        "$6$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4"
        "ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]
SPEC_SHA256 = [
    ("$5$saltstring", "Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "$5$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
]

PASSWORDS = [
    "",
    "a",
    "password",
    "x" * 63,
    "y" * 64,
    "z" * 65,
    "long passphrase " * 10,  # 160 bytes
    "pässwörd ✓ 密码",
    "with:colon and $dollar \\ and 'quotes'\t",
]
SALTS = ["a", "saltsalt", "0123456789abcdef", "./AZaz09./AZaz09"]


@pytest.mark.parametrize(("setting", "password", "expected"), SPEC_SHA512 + SPEC_SHA256)
def test_spec_vectors(setting, password, expected):
    assert sha_crypt(password, setting) == expected
    assert sha_crypt(password, expected) == expected  # the hash is its own setting
    assert verify_password(password, expected)
    assert not verify_password(password + "!", expected)


def test_empty_salt():
    # openssl passwd refuses an empty salt; glibc's and libxcrypt's crypt give this value
    expected = (
        "$6$$QMXjqd7rHQZPQ1yHsXkQqC1FBzDiVfTHXL.LaeDAeVV.IzMaV9VU4MQ8kPuZa2SOP1A0RPm772EaFYjpEJtdu."
    )
    assert hash_password("foo", "") == expected
    assert sha_crypt("foo", "$6$$bar$") == expected
    assert libcrypt().crypt(b"foo", b"$6$$") == expected.encode()


def libcrypt() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypt")
    assert name, "libcrypt is required for this test (Debian: apt-get install libcrypt1)"
    lib = ctypes.CDLL(name)
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return lib


@pytest.mark.parametrize("password", PASSWORDS)
def test_matches_the_c_library_nginx_uses(password):
    lib = libcrypt()
    for setting in ("$6$Ab3/xYz.0123456", "$6$rounds=2000$Q", "$5$Ab3/xYz.", "$1$Ab3/xYz."):
        expected = lib.crypt(password.encode(), setting.encode())
        assert expected, f"libcrypt refused {setting}"
        crypt = md5_crypt if setting.startswith("$1$") else sha_crypt
        assert crypt(password, setting) == expected.decode()
    ours = hash_password(password)
    assert lib.crypt(password.encode(), ours.encode()).decode() == ours


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("salt", SALTS)
def test_hash_password_with_a_salt_matches_the_c_library(password, salt):
    expected = libcrypt().crypt(password.encode(), f"$6${salt}".encode())
    assert hash_password(password, salt) == expected.decode()


def test_hash_password_uses_a_fresh_random_salt():
    hashes = {hash_password("same") for _ in range(20)}
    assert len(hashes) == 20
    for h in hashes:
        assert h.startswith("$6$")
        _, _, salt, digest = h.split("$")
        assert len(salt) == 16
        assert set(salt) <= set(CRYPT_ALPHABET)
        assert len(digest) == 86
        assert verify_password("same", h)


@pytest.mark.parametrize("salt", ["x" * 17, "bad$salt", "no:colon", "spa ce", "ümlaut"])
def test_hash_password_rejects_bad_salts(salt):
    with pytest.raises(ValueError, match="salt"):
        hash_password("pw", salt)


def test_verify_sha1_scheme():
    hashed = "{SHA}" + base64.b64encode(hashlib.sha1(b"secret").digest()).decode()
    assert verify_password("secret", hashed)
    assert not verify_password("Secret", hashed)


@pytest.mark.parametrize(
    "hashed",
    ["", "plain", "$2y$10$abcdefghijklmnopqrstuv", "$6", "$7$x$y", "{SSHA}abc", "$apr1"],
)
def test_verify_unknown_or_malformed_never_matches(hashed):
    assert not verify_password("plain", hashed)
    assert not verify_password("", hashed)


def test_verify_rejects_a_truncated_hash():
    good = hash_password("pw", "saltsalt")
    assert verify_password("pw", good)
    assert not verify_password("pw", good[:-1])
    assert not verify_password("pw", good + "x")


def test_generate_password():
    seen = {generate_password() for _ in range(50)}
    assert len(seen) == 50
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    for pw in seen:
        assert len(pw) == 24
        assert set(pw) <= allowed


@pytest.mark.parametrize("name", ["admin", "lxdadm", "user.name-1_x", "ünïcode", "a@b"])
def test_validate_user_accepts(name):
    validate_user(name)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a:b", "':'"),
        ("a b", "whitespace"),
        ("tab\t", "whitespace"),
        ("new\nline", "whitespace"),
        ("nul\x00", "control"),
        ("#admin", "'#'"),
    ],
)
def test_validate_user_rejects(name, why):
    with pytest.raises(ValueError, match=why):
        validate_user(name)


def mode(path: str | os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def dotfiles(directory: str | os.PathLike[str]) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".")]


def test_read_users(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(
        "# a comment\n"
        "\n"
        "alice:$6$aaa$hash1\n"
        "bob:{SHA}xyz:Bob the builder\n"
        "alice:$6$bbb$second-ignored\n"
        "carol:\n"
        "  \n"
    )
    assert read_users(str(path)) == {"alice": "$6$aaa$hash1", "bob": "{SHA}xyz", "carol": ""}
    assert read_users(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_set_password_creates_file(tmp_path, umask):
    path = tmp_path / "htpasswd"
    old = os.umask(umask)
    try:
        assert set_password(str(path), "admin", "s3cret") is True
    finally:
        os.umask(old)
    assert mode(path) == 0o640
    users = read_users(str(path))
    assert list(users) == ["admin"]
    assert users["admin"].startswith("$6$")
    assert verify_password("s3cret", users["admin"])
    assert path.read_text() == f"admin:{users['admin']}\n"
    assert dotfiles(tmp_path) == []


def test_set_password_replaces_and_keeps_the_rest(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(
        "# managed by hand\n"
        "alice:$apr1$x$old:Alice Liddell\n"
        "\n"
        "bob:{SHA}keepme\n"
        "alice:$6$dead$duplicate\n"
        "carol:$6$c$keep"  # no final newline
    )
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
    assert set_password(str(path), "alice", "new-pass") is False
    lines = path.read_text().split("\n")
    assert lines[0] == "# managed by hand"
    user, hashed, comment = lines[1].split(":")
    assert (user, comment) == ("alice", "Alice Liddell")
    assert verify_password("new-pass", hashed)
    assert lines[2:] == ["", "bob:{SHA}keepme", "carol:$6$c$keep", ""]
    assert mode(path) == 0o640
    assert os.stat(path).st_ino != inode  # replaced by rename, not rewritten in place
    assert dotfiles(tmp_path) == []

    assert set_password(str(path), "dave", "pw") is True
    assert list(read_users(str(path))) == ["alice", "bob", "carol", "dave"]
    assert verify_password("new-pass", read_users(str(path))["alice"])


def test_remove_user_revokes_one_and_keeps_the_rest(tmp_path):
    """Per-client credentials of a private feed: one leaked password is revoked alone."""
    path = tmp_path / "htpasswd"
    path.write_text("# by hand\nhost1:$6$a$x\nhost2:$6$b$y\nhost1:$6$dead$dup\n")
    assert remove_user(str(path), "host1") is True
    assert path.read_text() == "# by hand\nhost2:$6$b$y\n"
    assert mode(path) == 0o640 and dotfiles(tmp_path) == []
    assert remove_user(str(path), "host1") is False
    with pytest.raises(ValueError):
        remove_user(str(path), "bad:name")


def test_set_password_validates_the_user(tmp_path):
    path = tmp_path / "htpasswd"
    with pytest.raises(ValueError):
        set_password(str(path), "bad:name", "pw")
    assert not path.exists()


def test_set_password_follows_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.write_text("bob:{SHA}x\n")
    link = tmp_path / "htpasswd"
    link.symlink_to(real)
    set_password(str(link), "alice", "pw")
    assert link.is_symlink()
    assert list(read_users(str(real))) == ["bob", "alice"]


def test_set_password_group_by_name_and_unknown_group(tmp_path):
    path = tmp_path / "htpasswd"
    name = grp.getgrgid(os.getegid()).gr_name
    set_password(str(path), "alice", "pw", group=name)
    assert os.stat(path).st_gid == os.getegid()
    with pytest.raises(ValueError, match="no such group"):
        set_password(str(path), "alice", "pw2", group="no-such-group-here")
    assert verify_password("pw", read_users(str(path))["alice"])
