"""Building and writing streams/: hashes, deltas, the catalog, its encoding, publishing, the page,
retention, the pipeline and the watcher."""
