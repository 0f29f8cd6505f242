"""Identity -> credential: the authenticators of both modes.

Belongs here: what turns a login into what the spawner needs to reach the cluster as that
person: :mod:`.github` (gateway mode: a GitHub login, its numeric id kept in auth_state),
:mod:`.cilogon` (xsede mode: a CILogon login, then a short-lived SSH certificate kept in
the encrypted auth_state) and :mod:`.issuer_client` (the hub's client of the certificate
issuer).

Does not belong here: anything that talks to the cluster (:mod:`xsedehub.spawner`), the
issuer service itself (:mod:`xsedehub.issuer_service`), or test scaffolding.
"""
