"""The command's errors: one sentence on stderr and exit code 1, never a traceback.

CliError is a problem the user can fix that a command found itself. The
layers below raise their own errors, each one sentence by contract; `main`
prints those the same way (SENTENCES), so no command has to translate them.
"""

from __future__ import annotations

from moorage.cluster.addresses import AddressError
from moorage.cluster.etcd_member import EtcdError
from moorage.cluster.pki import PkiError
from moorage.cluster.replica_config import StartError


class CliError(Exception):
    """A problem the user can fix; printed as one sentence, exit code 1."""


# Everything printed as "moorage: <sentence>" with exit code 1.
SENTENCES = (CliError, AddressError, EtcdError, PkiError, StartError)
