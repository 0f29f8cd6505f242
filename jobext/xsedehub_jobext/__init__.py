"""xsedehub's job-side extension, installed in the job environment.

* a JupyterLab extension (prebuilt, under ``share/jupyter/labextensions/xsedehub-jobext``)
  that shows the SLURM job's time left in the status bar and warns before the walltime;
* this jupyter-server extension, which answers it at ``<base_url>xsedehub/walltime``
  by asking the hub (``<JUPYTERHUB_API_URL>/xsedehub/walltime/<server name>``, with the
  server's own hub API token): the hub follows SLURM (``squeue``'s time left), so the
  node needs no SLURM command (gateway-mode servers run in a sandbox without them).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "xsedehub_jobext"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "xsedehub-jobext"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .handlers import setup_handlers

    setup_handlers(serverapp)
