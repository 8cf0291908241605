"""Packaging metadata for lxd-image-server."""

import re
from pathlib import Path

from setuptools import find_packages, setup

#: one version: lxd_image_server.__version__ (tests/unit/test_version.py checks debian/changelog)
HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"',
    (HERE / "lxd_image_server" / "__init__.py").read_text(encoding="utf-8"),
)
assert VERSION is not None

setup(
    name="lxd-image-server",
    version=VERSION[1],
    description="Private simplestreams image server for LXD and Incus",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["lxd_image_server", "lxd_image_server.*"]),
    package_data={
        "lxd_image_server": ["py.typed"],
        "lxd_image_server.catalog": ["page_assets/page.css", "page_assets/page.js"],
    },
    install_requires=[
        "click>=8.1",
        "inotify_simple>=1.3",
        "cryptography>=38",
        "gunicorn>=20.1",
        "PyYAML>=6.0",
    ],
    entry_points={
        "console_scripts": ["lxd-image-server=lxd_image_server.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Systems Administration",
    ],
)
