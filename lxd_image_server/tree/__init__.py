"""What lies under images/: the layout of a version directory, its metadata overrides, the scan."""
