"""What `init` and `run` tell a client machine to run (service/initialize.py)."""

from __future__ import annotations

from lxd_image_server.service.initialize import client_instructions


def test_a_public_server_is_added_by_its_url() -> None:
    text = client_instructions("img.example", "8443", None, ("upload", "pw"))
    assert "lxc remote add myimages https://img.example:8443 --protocol simplestreams" in text
    assert "CLIENT" not in text and "clear text" not in text


def test_a_private_server_gets_a_clients_own_credentials_and_the_warning() -> None:
    """Without credentials in the URL a private remote fails; with them, the password
    crosses in clear text before each file unless on 443 (README: Private feeds)."""
    text = client_instructions("img.example", "8443", None, ("upload", "pw"), private=True)
    assert (
        "lxc remote add myimages https://CLIENT:PASSWORD@img.example:8443 --protocol "
        "simplestreams" in text
    )
    assert "passwd CLIENT --delete" in text and "clear text" in text
    # the upload commands keep the upload user's own credentials
    assert "curl -u upload:pw" in text
    on_443 = client_instructions("img.example", "443", None, None, private=True)
    assert "https://CLIENT:PASSWORD@img.example --protocol" in on_443
