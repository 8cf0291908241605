"""The all-in-one image (container/Containerfile) end to end, with podman and the real LXD daemon.

- TLS mode with the test CA's certificate mounted: the seed's curl uploads, `lxc launch`, then
  a stop and a new container on the same volumes: nothing republished, the image still launches.
- Plain HTTP behind an nginx TLS proxy, as behind an ingress: the same, through the proxy.
- Credentials: none (401, and the log says how), a user added at run time, anonymous uploads.
- The health check fails when nginx, the upload server or the watcher is down.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.images import sha256_file
from tests.integration.servers import (
    REPO,
    Pki,
    delete_images,
    delete_instance,
    free_port,
    lxc,
    lxc_json,
    run,
)

from .conftest import Busybox, Containers
from .engine import DEADLINE, IMAGE, UID, Container, TlsProxy, curl, owned_dir, podman, ulimits

USER = "upload"
PASSWORD = "container-password-1"
SERIAL = "20240105_10:00"


# -- helpers -----------------------------------------------------------------------------------


def seed_upload(url: str, product: str, image: Busybox, user: str, cacert: Path) -> None:
    """The seeds' two curl commands, verbatim apart from host and credentials."""
    d = f"{product}/{SERIAL}"
    for path, name in ((image.meta, "lxd.tar.xz"), (image.squashfs, "rootfs.squashfs")):
        code, body = curl(
            f"-Fupload=@{path};filename={d}/{name}", f"{url}/images/", user=user, cacert=cacert
        )
        assert code == 201, f"upload of {name} answered {code}: {body}"
        stored = json.loads(body)["files"][0]
        assert stored["path"] == f"{d}/{name}"
        assert stored["size"] == path.stat().st_size


def wait_listed(c: Container, product: str) -> None:
    key = product.replace("/", ":")
    end = time.monotonic() + DEADLINE
    while SERIAL not in c.volumes.catalog()["products"].get(key, {}).get("versions", {}):
        assert time.monotonic() < end, f"{key} {SERIAL} never listed:\n{c.logs()}"
        time.sleep(0.1)


def launch(url: str, alias: str, image: Busybox, instance: str) -> None:
    """`lxc launch` from the server at `url`, and a command in the instance. The local copy
    is deleted first and afterwards: the image must come from the server each time."""
    remote = f"ct{url.rsplit(':', 1)[1]}"
    fingerprints = {sha256_file(image.meta, image.squashfs)}
    delete_images(fingerprints)
    if remote in lxc_json("remote", "list"):
        lxc("remote", "remove", remote)
    lxc("remote", "add", remote, url, "--protocol", "simplestreams")
    try:
        lxc("launch", f"{remote}:{alias}", instance, timeout=300)
        assert lxc("exec", instance, "--", "/bin/busybox", "echo", "ok").strip() == "ok"
    finally:
        delete_instance(instance)
        lxc("remote", "remove", remote)
        delete_images(fingerprints)


def catalog_files(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """streams/v1/* -> (bytes, inode, mtime_ns)."""
    out = {}
    for p in sorted((root / "streams" / "v1").iterdir()):
        st = p.stat()
        out[p.name] = (p.read_bytes(), st.st_ino, st.st_mtime_ns)
    return out


def cached_hashes(state: Path) -> set[tuple[str, str]]:
    db = sqlite3.connect(f"file:{state / 'hashes.sqlite3'}?mode=ro", uri=True)
    try:
        return set(db.execute("SELECT path, sha256 FROM files").fetchall())
    finally:
        db.close()


def ssl_mount(pki: Pki, base: Path) -> list[str]:
    """The test CA's server certificate as /etc/lxd-image-server/ssl/nginx.{crt,key}."""
    ssl = owned_dir(base / "ssl")
    for src, name in ((pki.server_cert, "nginx.crt"), (pki.server_key, "nginx.key")):
        (ssl / name).write_bytes(src.read_bytes())
        os.chown(ssl / name, UID, UID)
        (ssl / name).chmod(0o600 if name.endswith(".key") else 0o644)
    return ["-v", f"{ssl}:/etc/lxd-image-server/ssl:ro"]


def htpasswd_mount(base: Path, user: str, password: str) -> list[str]:
    """An htpasswd file made by the image's own `lxd-image-server passwd`, mounted read-only."""
    owned_dir(base)
    proc = podman(
        "run",
        "--rm",
        "-i",
        "--network",
        "none",
        *ulimits(),
        "-v",
        f"{base}:/out",
        IMAGE,
        "lxd-image-server",
        "passwd",
        user,
        "--htpasswd",
        "/out/htpasswd",
        input=password + "\n",
    )
    assert "added" in proc.stdout, proc.stdout
    return ["-v", f"{base / 'htpasswd'}:/etc/lxd-image-server/htpasswd:ro"]


def changelog_version() -> str:
    return run(
        ["dpkg-parsechangelog", "-l", REPO / "debian/changelog", "-S", "Version"]
    ).stdout.strip()


# -- the image ---------------------------------------------------------------------------------


def test_image_is_the_package_as_shipped(image: str) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    assert info["Config"]["User"] == f"{UID}:{UID}"
    assert set(info["Config"]["Volumes"]) == {"/var/www/simplestreams", "/var/lib/lxd-image-server"}
    assert {"8443/tcp", "1080/tcp"} <= set(info["Config"]["ExposedPorts"])
    assert info["Healthcheck"]["Test"] == [
        "CMD",
        "lxd-image-server",
        "--state-dir",
        "/var/lib/lxd-image-server",
        "health",
    ]
    assert info["Config"]["Entrypoint"][0] == "/usr/bin/tini"

    deb = next((REPO / "dist" / "apt").glob("lxd-image-server_*_all.deb"))
    shipped = run(["sh", "-c", f"dpkg-deb --ctrl-tarfile {deb} | tar -xO ./md5sums"]).stdout
    script = (
        "dpkg-query -W -f '${Version} ${Status}\\n' lxd-image-server;"
        # the slim base leaves out documentation and manuals (dpkg path-exclude)
        " dpkg --verify lxd-image-server | grep -vE ' /usr/share/(doc|man)/' || echo verified;"
        " cat /var/lib/dpkg/info/lxd-image-server.md5sums;"
        " ls /etc/nginx/ssl/nginx.key /etc/lxd-image-server/htpasswd /etc/ssh/ssh_host_*_key"
        " /var/www/simplestreams/streams 2>&1 | grep -v 'No such file' || true"
    )
    out = podman(
        "run", "--rm", "--network", "none", *ulimits(), image, "sh", "-c", script
    ).stdout.splitlines()
    # exactly our package from dist/apt, installed and unmodified
    assert out[0] == f"{changelog_version()} install ok installed"
    assert out[1] == "verified", out
    installed = out[2 : 2 + len(shipped.splitlines())]
    assert installed == shipped.splitlines()
    # no per-host secret or state baked into the image: each container makes its own
    assert out[2 + len(installed) :] == []


# -- TLS mode: upload, launch, restart ---------------------------------------------------------


@pytest.mark.lxd
def test_tls_mode_upload_launch_restart(
    containers: Containers, pki: Pki, make_busybox, label: str
) -> None:
    img = make_busybox("tls")
    c = containers.make(
        "tls",
        env={"UPLOAD_USER": USER, "UPLOAD_PASSWORD": PASSWORD},
        mounts=ssl_mount(pki, containers.base),
    )
    c.start()
    c.wait_healthy()
    assert "TLS with the mounted certificate" in c.logs()
    assert c.exec("id", "-u").stdout.strip() == str(UID)

    product = "busyct/1.35/amd64/default"
    ca = pki.ca_cert  # explicit: curl's failures then never depend on the system store
    code, out = curl(
        f"-Fupload=@{img.meta};filename={product}/{SERIAL}/lxd.tar.xz",
        f"{c.url}/images/",
        cacert=ca,
    )
    assert code == 401, out
    seed_upload(c.url, product, img, f"{USER}:{PASSWORD}", ca)
    wait_listed(c, product)
    launch(c.url, "busyct/1.35", img, f"lis-{label}-ct-tls")
    # ALLOW_DELETES is off unless asked for
    code, out = curl(
        "-X", "DELETE", f"{c.url}/images/{product}/{SERIAL}", user=f"{USER}:{PASSWORD}", cacert=ca
    )
    assert code == 405, out
    assert {p.stat().st_uid for p in c.volumes.root.rglob("*")} == {UID}

    catalog = catalog_files(c.volumes.root)
    page = (c.volumes.root / "streams" / "index.html").stat()
    hashes = cached_hashes(c.volumes.state)
    for name in ("lxd.tar.xz", "rootfs.squashfs"):
        assert any(path.endswith(f"{product}/{SERIAL}/{name}") for path, _ in hashes), hashes
    code, seconds = c.stop()
    print(f"TLS container stopped in {seconds:.1f} s")
    logs = c.logs()
    assert code == 0, f"exit {code} on SIGTERM (137: it had to be killed):\n{logs}"
    assert "received SIGTERM; stopping" in logs

    # a new container on the same volumes (what a pod restart is)
    c.start()
    c.wait_healthy()
    logs = c.logs()
    assert catalog_files(c.volumes.root) == catalog, "the catalog was rewritten"
    assert (c.volumes.root / "streams" / "index.html").stat().st_mtime_ns == page.st_mtime_ns
    assert cached_hashes(c.volumes.state) == hashes
    assert "published" not in logs, logs
    launch(c.url, "busyct/1.35", img, f"lis-{label}-ct-tls2")


# -- plain HTTP behind a TLS proxy -------------------------------------------------------------


@pytest.mark.lxd
def test_plain_mode_behind_tls_proxy(
    containers: Containers, pki: Pki, make_busybox, label: str
) -> None:
    img = make_busybox("plain")
    auth = f"{USER}:{PASSWORD}"
    c = containers.make(
        "plain",
        env={"ALLOW_OVERWRITES": "1", "ALLOW_DELETES": "yes"},
        mounts=htpasswd_mount(containers.base / "auth", USER, PASSWORD),
        plain=True,
    )
    c.start()
    c.wait_healthy()
    assert "upload credentials from /etc/lxd-image-server/htpasswd" in c.logs()
    assert curl(f"{c.url}/streams/v1/index.json")[0] == 200

    proxy = TlsProxy(pki, owned_dir(containers.base / "proxy"), free_port(), c.port)
    proxy.start()
    try:
        product = "busyplain/1.35/amd64/default"
        ca = pki.ca_cert
        code, out = curl(
            "-T", img.meta, f"{proxy.url}/images/{product}/{SERIAL}/lxd.tar.xz", cacert=ca
        )
        assert code == 401, out
        seed_upload(proxy.url, product, img, auth, ca)
        wait_listed(c, product)
        launch(proxy.url, "busyplain/1.35", img, f"lis-{label}-ct-plain")

        # ALLOW_OVERWRITES: the same name again replaces the file (no rootfs.squashfs.1)
        d = f"{product}/{SERIAL}"
        code, body = curl(
            f"-Fupload=@{img.squashfs};filename={d}/rootfs.squashfs",
            f"{proxy.url}/images/",
            user=auth,
            cacert=ca,
        )
        assert code == 201, body
        assert json.loads(body)["files"][0]["path"] == f"{d}/rootfs.squashfs"
        # ALLOW_DELETES: the version goes, and leaves the catalog
        code, body = curl("-X", "DELETE", f"{proxy.url}/images/{d}", user=auth, cacert=ca)
        assert code == 200, body
        end = time.monotonic() + DEADLINE
        while product.replace("/", ":") in c.volumes.catalog()["products"]:
            assert time.monotonic() < end, f"still listed after DELETE:\n{c.logs()}"
            time.sleep(0.1)
    finally:
        proxy.stop()
    code, _ = c.stop()
    assert code == 0, c.logs()


# -- credentials -------------------------------------------------------------------------------


def test_without_credentials_uploads_are_refused_until_a_user_is_added(
    containers: Containers, make_busybox
) -> None:
    img = make_busybox("nocreds")
    c = containers.make("nocreds", env={"SERVER_NAMES": "images.example.com,192.0.2.7"})
    c.start()
    c.wait_healthy()
    logs = c.logs()
    # how to enable them, in the container's terms
    for hint in (
        "uploads are refused (401)",
        "UPLOAD_USER",
        "/etc/lxd-image-server/htpasswd",
        "ALLOW_ANONYMOUS_UPLOADS=1",
        "lxd-image-server passwd USER",
    ):
        assert hint in logs, f"{hint!r} not in the log:\n{logs}"
    # no certificate mounted: one was made, on the state volume, and is the one served
    cert = c.volumes.state / "ssl" / "nginx.crt"
    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "images.example.com" in names.value.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("192.0.2.7") in names.value.get_values_for_type(x509.IPAddress)
    target = f"{c.url}/images/nocreds/1.0/amd64/default/{SERIAL}/lxd.tar.xz"
    assert curl("-T", img.meta, target, cacert=cert)[0] == 401
    assert curl("-T", img.meta, target, cacert=cert, user="upload:guess")[0] == 401

    # the log's last advice: a user added to the running container works without a restart
    podman(
        "exec",
        "-i",
        c.name,
        "lxd-image-server",
        "passwd",
        "bob",
        "--htpasswd",
        "/var/lib/lxd-image-server/htpasswd",
        input=PASSWORD + "\n",
    )
    code, body = curl("-T", img.meta, target, cacert=cert, user=f"bob:{PASSWORD}")
    assert code == 201, body


def test_anonymous_uploads_and_debug(containers: Containers, make_busybox) -> None:
    img = make_busybox("anon")
    c = containers.make("anon", env={"ALLOW_ANONYMOUS_UPLOADS": "1", "DEBUG": "1"}, plain=True)
    c.start()
    c.wait_healthy()
    assert "anonymous uploads are allowed" in c.logs()
    path = f"/images/anon/1.0/amd64/default/{SERIAL}/lxd.tar.xz"
    code, body = curl("-T", img.meta, f"{c.url}{path}")
    assert code == 201, body
    # DEBUG=1: the access logs of nginx and the upload server go to the container's log
    end = time.monotonic() + DEADLINE
    while f"PUT {path}" not in c.logs():
        assert time.monotonic() < end, c.logs()
        time.sleep(0.2)


def test_http_listen_serves_image_files_only(containers: Containers, make_busybox) -> None:
    """HTTP_LISTEN: image files over plain HTTP too, nothing else (issue 12)."""
    img = make_busybox("http")
    http_port = free_port()
    c = containers.make(
        "http",
        env={"ALLOW_ANONYMOUS_UPLOADS": "1", "HTTP_LISTEN": f"127.0.0.1:{http_port}"},
        plain=True,
    )
    c.start()
    c.wait_healthy()
    path = f"/images/http/1.0/amd64/default/{SERIAL}/lxd.tar.xz"
    plain = f"http://127.0.0.1:{http_port}"
    assert curl("-T", img.meta, f"{plain}{path}")[0] == 405
    code, body = curl("-T", img.meta, f"{c.url}{path}")
    assert code == 201, body
    assert curl("-I", f"{plain}{path}")[0] == 200
    assert curl(f"{plain}/streams/v1/index.json")[0] == 404


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PLAIN_HTTP": "maybe"}, "PLAIN_HTTP=maybe: expected"),
        ({"UPLOAD_USER": "someone"}, "set both UPLOAD_USER and UPLOAD_PASSWORD"),
        (
            {"UPLOAD_USER": "a", "UPLOAD_PASSWORD": "b", "ALLOW_ANONYMOUS_UPLOADS": "1"},
            "choose one",
        ),
        ({"ALLOW_DELETES": "maybe"}, "ALLOW_DELETES='maybe'"),
    ],
    ids=["bad-flag", "half-credentials", "two-credentials", "bad-program-flag"],
)
def test_bad_environment_stops_with_a_reason(
    containers: Containers, env: dict[str, str], message: str
) -> None:
    c = containers.make("badenv", env=env)
    c.start()
    code = c.wait_exited()
    assert code != 0
    assert message in c.logs()


def test_a_volume_the_user_cannot_write_is_explained(containers: Containers) -> None:
    c = containers.make("rootvol")
    os.chown(c.volumes.root, 0, 0)
    c.start()
    assert c.wait_exited() == 1
    assert "/var/www/simplestreams is not writable by uid 10001" in c.logs(), c.logs()


# -- health ------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["watcher", "upload", "nginx"])
def test_health_check_fails_when_a_part_is_down(containers: Containers, part: str) -> None:
    """The part is killed while `run` is paused (as if it hung), so nothing reacts to the
    death but the health check; resumed, `run` stops the rest and the container exits 1."""
    c = containers.make(f"health-{part}")
    c.start()
    c.wait_healthy()
    procs = c.processes()
    supervisor = next(
        pid for pid, _, args in procs if "lxd-image-server" in args and " run " in args
    )
    marker = {"watcher": " watch ", "upload": "gunicorn", "nginx": "nginx: master"}[part]
    target = next(pid for pid, ppid, args in procs if ppid == supervisor and marker in args)
    victims = [target] + [pid for pid, ppid, _ in procs if ppid == target]

    c.exec("kill", "-STOP", str(supervisor))
    c.exec("kill", "-KILL", *map(str, victims))
    end = time.monotonic() + DEADLINE
    while (hc := c.healthcheck()).returncode == 0:
        assert time.monotonic() < end, "still healthy"
        time.sleep(0.2)
    assert hc.returncode == 1 and "unhealthy" in hc.stdout, hc
    health = c.exec("lxd-image-server", "health", check=False)
    assert health.returncode == 1
    failed = [
        line.split()[1].rstrip(":")
        for line in health.stdout.splitlines()
        if line.startswith("FAIL")
    ]
    assert failed == [part], health.stdout

    c.exec("kill", "-CONT", str(supervisor))
    assert c.wait_exited() == 1
    assert f"{part} exited with status" in c.logs()
