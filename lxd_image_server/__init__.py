"""lxd-image-server: turn a directory of LXD/Incus images into a simplestreams remote."""

__version__ = "0.2.0"
