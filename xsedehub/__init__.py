"""xsedehub: JupyterHub servers as SLURM batch jobs on an HPC cluster, tunnelled back to the hub.

* :mod:`xsedehub.auth` turns an identity into a credential (GitHub login for the shared
  gateway account, or a short-lived SSH certificate for the user's own account).
* :mod:`xsedehub.spawner` turns a credential into a batch job and a tunnel.
* :mod:`xsedehub` itself holds what surrounds them on the hub: mode selection
  (:mod:`.config`), the TLJH plugin (:mod:`.tljh`), the admin's command line
  (:mod:`.cli`, :mod:`.check`, :mod:`.tunnelsetup`, :mod:`.orphans`) and the reference
  certificate issuer (:mod:`.issuer_service`).
* :mod:`xsedehub.testbed` is the local test ground (cluster, hub wiring, namespaces,
  demo).  The product never imports it; only the command line's ``cluster``, ``demo``
  and ``bridge`` subcommands do.

Does not belong in the product: test scaffolding (that is :mod:`xsedehub.testbed` or
``tests/``).
"""

__version__ = "0.1.0"
