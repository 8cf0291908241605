"""The importer's errors (`import`, `push`): what cli/common.py EXIT_CODES maps to exit codes."""

from __future__ import annotations


class ImportFailed(Exception):
    """The files cannot be imported; the message says why. Nothing was changed."""


class NamingError(ImportFailed):
    """A naming option (--os, --arch, ...) is unusable: a usage error."""


class VersionExists(ImportFailed):
    """The version directory exists and --force was not given."""
