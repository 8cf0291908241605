"""`python3 -m lxd_image_server` is the lxd-image-server command."""

from .cli import main

main()
