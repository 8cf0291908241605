"""The host: the certificate, the nginx site, `init`, `run`, `health`."""
