"""gunicorn settings of the upload app, one place for the systemd unit and `run`:

    python3 -m gunicorn -c python:lxd_image_server.web.gunicorn_conf [--bind ...] \\
        'lxd_image_server.web.upload:app_from_env()'

(`python:` config modules work from gunicorn 19.x on, so with Debian 12's 20.1.) Options on
the command line and in GUNICORN_CMD_ARGS override these; names this gunicorn does not know
are ignored by it.

Why these values:
- gthread workers: a sync worker busy with one long upload cannot heartbeat and is killed
  after `timeout` seconds.
- 2 workers x 16 threads: 32 uploads at once. A stalled client holds a thread for at most the
  app's read timeout (UPLOAD_READ_TIMEOUT, 60 s per 256 KiB read), and the app lets one
  credential hold at most upload.max_parallel (8, at most 16) of them (upload_slots.py), so
  one credential's stalled uploads cannot take every thread. An idle thread
  costs nothing measurable; an active upload holds about 10 MiB of buffers and 3 short-lived
  threads (upload_sink: the writer and one per digest).
- graceful_timeout 5 s: what a stop waits for uploads in progress; below `run`'s 10 s and
  systemd's TimeoutStopSec=30s, so gunicorn ends them itself, cleanly.
"""

from __future__ import annotations

worker_class = "gthread"
workers = 2
threads = 16
timeout = 120
graceful_timeout = 5
# the log goes to stderr (the journal, or `run`'s output); the access log is off
errorlog = "-"
accesslog = None
# gunicorn >= 24 opens a control socket in $HOME unless told not to; never used here
control_socket_disable = True
