"""Where this node's replica serves its API, for commands run on the same node.

`serve` (and `join`) write DATA_DIR/api.json once the API listens: the
advertised URL and the CA file its certificate chains to. `moorage status`,
`gc`, `user`, ... run on the node read it (from --data-dir, default
./moorage-data, as `serve` uses), so they need neither --existing nor
--ca-cert there. The file holds nothing secret: the URL is the one the
replica records in etcd for everyone, and the CA certificate is public.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "api.json"


@dataclass(frozen=True)
class LocalApi:
    url: str
    # The CA file that verifies the API's certificate: the cluster CA's copy in
    # DATA_DIR/tls; None for an operator's own certificate (the system's trust
    # store verifies it) and for plain HTTP.
    ca_cert: str | None


def save(data_dir: Path, api: LocalApi) -> None:
    tmp = data_dir / (FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(api), indent=2) + "\n")
    os.replace(tmp, data_dir / FILE)


def load(data_dir: Path) -> LocalApi | None:
    """The recorded endpoint; None when no replica ever served from `data_dir` (or the file is not ours)."""
    try:
        data = json.loads((data_dir / FILE).read_text())
        return LocalApi(url=str(data["url"]), ca_cert=data.get("ca_cert"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
