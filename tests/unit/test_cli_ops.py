"""The operator commands through the real `lxd-image-server` group (click's CliRunner):
options, messages and exit codes (0 ok, 1 failure or mismatch, 2 usage)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lxd_image_server.cli.root import main
from lxd_image_server.ops.pushclient import PASSWORD_ENV

from .test_importer import CREATED, VERSION, metadata_yaml, split_export, unified_export

COMMANDS = ("import", "push", "list", "verify", "prune", "remove")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME and no configuration from the machine: only what the tests give."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("LXD_IMAGE_SERVER_CONFIG", PASSWORD_ENV, "DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def cli(env: Path, *args: str, config: str | None = None) -> Result:
    pre = ["--state-dir", str(env / "state")]
    if config:
        pre += ["--config", config]
    return CliRunner().invoke(main, [*pre, *args], catch_exceptions=False)


def tree_args(env: Path) -> list[str]:
    return ["--root-dir", str(env / "root")]


def catalog_versions(env: Path) -> dict[str, list[str]]:
    doc = json.loads((env / "root/streams/v1/images.json").read_bytes())
    return {k: sorted(p["versions"]) for k, p in doc["products"].items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_help(env: Path, command: str) -> None:
    result = cli(env, command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: main" in result.output or "Usage:" in result.output
    if command != "push":
        assert "--root-dir" in result.output


def test_import_list_verify(env: Path) -> None:
    files = [str(f) for f in split_export(env / "export")]
    r = cli(env, "import", *files, *tree_args(env))
    assert r.exit_code == 0, r.output
    assert "imported busybox:1.35:amd64:default 20240101_12:00" in r.output
    assert catalog_versions(env) == {"busybox:1.35:amd64:default": ["20240101_12:00"]}

    r = cli(env, "import", *files, *tree_args(env))
    assert r.exit_code == 1
    assert "already exists; --force replaces its files" in r.output
    r = cli(env, "import", *files, *tree_args(env), "--force")
    assert r.exit_code == 0, r.output

    r = cli(env, "list", *tree_args(env), "--format", "json")
    assert r.exit_code == 0
    (row,) = json.loads(r.output)
    assert row["product"] == "busybox:1.35:amd64:default"
    assert row["fingerprint"] == Path(files[1]).name.split(".")[0]

    r = cli(env, "verify", *tree_args(env))
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ok: 2 files")
    (env / "root/images" / VERSION / "rootfs.squashfs").unlink()
    r = cli(env, "verify", *tree_args(env))
    assert r.exit_code == 1
    assert "MISSING" in r.output and "rootfs.squashfs" in r.output


def test_verify_names_each_rule_broken_in_one_line(env: Path) -> None:
    """A catalog a newer client would refuse: one line per problem, exit 1; --quick finds the
    rules but not a flipped byte."""
    files = [str(f) for f in split_export(env / "export")]
    assert cli(env, "import", *files, *tree_args(env)).exit_code == 0
    images = env / "root/streams/v1/images.json"
    good = images.read_bytes()
    doc = json.loads(good)
    (product,) = doc["products"].values()
    (version,) = product["versions"].values()
    version["items"]["squashfs"]["sha256"] = version["items"]["squashfs"]["sha256"].upper()
    product["requirements"] = {"secureboot": "false"}
    images.write_text(json.dumps(doc))
    for quick in ([], ["--quick"]):
        r = cli(env, "verify", *tree_args(env), *quick)
        assert r.exit_code == 1
        lines = r.output.splitlines()
        assert [line.split()[0] for line in lines[:-1]] == ["REQUIREMENTS", "HASH"], r.output
        assert "items.squashfs.sha256" in lines[1] and "64 lowercase hex" in lines[1]
        assert lines[-1].startswith("2 problem(s)")

    images.write_bytes(good)
    squashfs = env / "root/images" / VERSION / "rootfs.squashfs"
    data = bytearray(squashfs.read_bytes())
    data[100] ^= 1
    squashfs.write_bytes(bytes(data))
    r = cli(env, "verify", *tree_args(env), "--quick")
    assert r.exit_code == 0 and "checked by size, not read (--quick)" in r.output
    r = cli(env, "verify", *tree_args(env))
    assert r.exit_code == 1 and "SHA256" in r.output

    (env / "root/streams/v1/index.json").write_bytes(b"")
    r = cli(env, "verify", *tree_args(env), "--quick")
    assert r.exit_code == 1 and "EMPTY        streams/v1/index.json" in r.output
    images.write_bytes(b"")
    r = cli(env, "verify", *tree_args(env))
    assert r.exit_code == 1 and "images.json is empty: clients refuse it" in r.output


def test_import_usage_errors_exit_2(env: Path) -> None:
    files = [str(f) for f in split_export(env / "export")]
    unified = str(unified_export(env / "u"))
    for args in (
        [*files, unified],
        [*files, "--arch", "sparc9"],
        [*files, "--serial", "soon"],
        [str(env / "missing.tar.xz")],
    ):
        r = cli(env, "import", *args, *tree_args(env))
        assert r.exit_code == 2, (args, r.output)
    yaml_without_os = metadata_yaml().replace("  os: busybox\n", "")
    files = [str(f) for f in split_export(env / "noos", yaml=yaml_without_os)]
    r = cli(env, "import", *files, *tree_args(env))
    assert r.exit_code == 2 and "give --os" in r.output
    assert not (env / "root/images/busybox").exists()


def test_import_failure_exits_1(env: Path) -> None:
    meta, _ = split_export(env / "export")
    r = cli(env, "import", str(meta), *tree_args(env))
    assert r.exit_code == 1
    assert "give the root filesystem too" in r.output


def test_prune_remove_and_update_after_the_grace_period(env: Path) -> None:
    for minutes in (0, 1, 2):
        yaml = metadata_yaml(created=CREATED + 60 * minutes)
        files = [str(f) for f in split_export(env / f"e{minutes}", yaml=yaml)]
        assert cli(env, "import", *files, *tree_args(env)).exit_code == 0
    product = "busybox:1.35:amd64:default"
    r = cli(env, "prune", *tree_args(env), "--keep", "2", "--dry-run")
    assert r.exit_code == 0
    assert r.output == f"would remove {product} 20240101_12:00\n"
    assert len(catalog_versions(env)[product]) == 3

    r = cli(env, "prune", *tree_args(env), "--keep", "2")
    assert r.exit_code == 0, r.output
    assert f"removed {product} 20240101_12:00 from the catalog" in r.output
    assert catalog_versions(env) == {product: ["20240101_12:01", "20240101_12:02"]}
    old = env / "root/images/busybox/1.35/amd64/default/20240101_12:00"
    assert old.is_dir()

    r = cli(env, "update", *tree_args(env))  # inside the grace period: files stay
    assert r.exit_code == 0 and old.is_dir()
    assert catalog_versions(env) == {product: ["20240101_12:01", "20240101_12:02"]}

    r = cli(env, "remove", product, "20240101_12:01", *tree_args(env))
    assert r.exit_code == 0, r.output
    assert catalog_versions(env) == {product: ["20240101_12:02"]}

    # the grace period is over: the next update deletes both
    state = env / "state" / "pruned.json"
    doc = json.loads(state.read_text())
    for entry in doc["pending"]:
        entry["expires"] = 0
    state.write_text(json.dumps(doc))
    r = cli(env, "update", *tree_args(env))
    assert r.exit_code == 0
    assert sorted(os.listdir(old.parent)) == ["20240101_12:02"]


def test_zero_grace_from_the_configuration(env: Path) -> None:
    config = env / "grace.toml"
    config.write_text("[prune]\ngrace_period = 0\n")
    files = [str(f) for f in split_export(env / "e")]
    assert cli(env, "import", *files, *tree_args(env)).exit_code == 0
    r = cli(env, "remove", "busybox:1.35:amd64:default", *tree_args(env), config=str(config))
    assert r.exit_code == 0, r.output
    assert "files deleted: no grace period" in r.output
    assert not (env / "root/images" / VERSION).exists()
    assert catalog_versions(env) == {}


def test_prune_and_remove_usage(env: Path) -> None:
    assert cli(env, "prune", *tree_args(env)).exit_code == 2  # --keep is required
    assert cli(env, "prune", *tree_args(env), "--keep", "0").exit_code == 2
    r = cli(env, "remove", "busybox:1.35", *tree_args(env))
    assert r.exit_code == 2 and "os:release:arch:variant" in r.output
    r = cli(env, "remove", "busybox:1.35:amd64:default", *tree_args(env))
    assert r.exit_code == 1 and "no product" in r.output


def test_list_and_verify_without_a_catalog(env: Path) -> None:
    for command in ("list", "verify"):
        r = cli(env, command, *tree_args(env))
        assert r.exit_code == 1 and "no catalog" in r.output


def test_push_usage_errors(env: Path) -> None:
    files = [str(f) for f in split_export(env / "export")]
    r = cli(env, "push", *files, "--remote", "http://127.0.0.1:1")
    assert r.exit_code == 2 and "https://" in r.output
    assert cli(env, "push", *files).exit_code == 2  # --remote is required


def test_push_failure_exits_1(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [str(f) for f in split_export(env / "export")]
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    r = cli(env, "push", *files, "--remote", "https://127.0.0.1:1")
    assert r.exit_code == 1 and "cannot talk to 127.0.0.1:1" in r.output
    r = cli(env, "push", *files, "--remote", "https://127.0.0.1:1", "--password-file", "/none")
    assert r.exit_code == 1 and "cannot read the password file" in r.output


def test_import_does_not_load_the_https_client(env: Path) -> None:
    """`import` (a command per image, start-up counts) loads what it uses: not the HTTPS
    client `push` needs (http.client, ssl, email)."""
    import subprocess
    import sys

    meta, root = split_export(env / "export")
    code = (
        "import sys\n"
        "from lxd_image_server.cli.root import main\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
        "print(' '.join(m for m in ('lxd_image_server.ops.pushclient', 'http.client', 'ssl')"
        " if m in sys.modules))\n"
    )
    args = ["--state-dir", str(env / "state"), "import", *tree_args(env), str(meta), str(root)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    assert proc.stdout.splitlines()[-1] == ""


def test_list_formats_are_listings() -> None:
    """cli/ops.py names `list`'s formats without importing ops/listing.py (import's start-up)."""
    from lxd_image_server.cli.ops import LIST_FORMATS
    from lxd_image_server.ops.listing import FORMATS

    assert LIST_FORMATS == FORMATS


def test_import_loads_neither_the_pipeline_nor_the_model() -> None:
    """`import` handed to a running watcher pays only for what it uses (a start-up per image)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import lxd_image_server.cli.root, lxd_image_server.cli.ops\n"
        "import lxd_image_server.ops.importing, lxd_image_server.ops.import_batch\n"
        "heavy = ('lxd_image_server.catalog.pipeline', 'lxd_image_server.catalog.model',\n"
        "         'lxd_image_server.catalog.retention', 'lxd_image_server.catalog.hashing',\n"
        "         'sqlite3')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
