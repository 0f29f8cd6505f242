"""The local test ground: a real SLURM cluster on this machine, and a hub wired to it.

Belongs here: what the demo, the end-to-end tests and the benchmark need to stand in for a
real site (:mod:`~xsedehub.testbed.localcluster`, the "mini-Comet" in network
namespaces; :mod:`~xsedehub.testbed.localhub`, a hub configuration and the processes
around it; :mod:`~xsedehub.testbed.netns`, namespace helpers;
:mod:`~xsedehub.testbed.demo`, ``xsedehub demo``).

Does not belong here: anything a deployed hub runs.  The product never imports this
package; only the command line's ``cluster``, ``demo`` and ``bridge`` subcommands do,
inside those subcommands.  The test ground may import the product (it runs the real
authenticator and spawner), never the other way round.
"""
