"""Mirrors: push the published tree to other servers with rsync over ssh.

- transport.py: the rsync and ssh command lines, the catalog copied aside, one push
  (`RsyncPusher`);
- sendlist.py: what a push sends: the files the published catalog lists, checked, held open;
- worker.py: one worker thread per [mirrors.NAME] with backoff (`Mirrors`, the pipeline's
  on_publish hook), and `push_once` for `update`;
- state.py: <state>/mirrors.json and the text of `mirror status`;
- authorize.py: the receiving side, `mirror authorize`, run as root on a mirror.

See docs/mirrors.md.
"""
