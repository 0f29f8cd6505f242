"""``python -m xsedehub.idleculler``: jupyterhub-idle-culler as the hub runs it for xsedehub
(:func:`xsedehub.config.idle_culler`), with the culler's own options.

Two things around the culler's own ``main``:

- SIGINT gets its default meaning back.  JupyterHub stops a managed service with SIGINT
  first and waits 30 s before trying SIGTERM; a hub started from a shell's background job
  (or anything else that ignores SIGINT) hands the culler an ignored SIGINT, and every
  hub shutdown then waited those 30 s.
- The hub API token is masked in what tornado logs when a cull fails (the hub
  unreachable, say): its "Exception in callback" line prints the culler's callback with
  its arguments, the token among them, into the hub's log.
"""

from __future__ import annotations

import logging
import re
import signal

_TOKEN = re.compile(r"(api_token=)(['\"])[^'\"]*\2")


class MaskToken(logging.Filter):
    """Replace ``api_token='...'`` in a log record's text with ``api_token='[secret]'``."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "api_token=" in text:
            record.msg, record.args = _TOKEN.sub(r"\1\2[secret]\2", text), ()
        return True


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("tornado.application", "asyncio"):
        logging.getLogger(name).addFilter(MaskToken())
    from jupyterhub_idle_culler import main as culler_main

    culler_main()


if __name__ == "__main__":
    main()
