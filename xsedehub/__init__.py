"""xsedehub: JupyterHub servers as SLURM batch jobs on an HPC cluster, tunnelled back to the hub.

* :mod:`xsedehub.auth` turns an identity into a credential (GitHub login for the shared
  gateway account, or a short-lived SSH certificate for the user's own account).
* :mod:`xsedehub.spawner` turns a credential into a batch job and a tunnel.
* :mod:`xsedehub` holds mode selection, configuration, the command line and the local
  test cluster.
"""

__version__ = "0.1.0"
