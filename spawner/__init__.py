"""Credential -> batch job and tunnel: the SLURM-over-SSH spawner.

Belongs here: everything a hub runs to start, watch and stop a user's server on the
cluster: :class:`~.spawner.SlurmSSHSpawner` (options, saved state, start/poll/stop) and
the pieces it puts together, one module per concern (SSH identity, the hub process's
shared services, connections and the shared squeue, tunnel keys, the job's script and
files, the waits, progress events, the form and validation).  :mod:`.slurm`,
:mod:`.validate` and :mod:`.form` are pure (no I/O).

Does not belong here: logging users in (:mod:`xsedehub.auth`), the admin's command line
and mode selection (:mod:`xsedehub`), the local test cluster (:mod:`xsedehub.testbed`).
"""
