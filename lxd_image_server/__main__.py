"""`python3 -m lxd_image_server` is the lxd-image-server command."""

from lxd_image_server.cli import main

main()
