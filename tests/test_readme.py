"""The README's offline skopeo example, run as written against a real replica.

Only the registry address and the scratch paths are swapped for the test's
own, so the documented commands cannot rot.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ENV

README = Path(__file__).resolve().parent.parent / "README.md"


def offline_example() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    chosen = [b for b in blocks if "oci:/tmp/hello-layout" in b]
    assert len(chosen) == 1, "the README should have one offline skopeo example"
    assert "tls-verify=false" not in chosen[0], "the example should verify the registry's certificate"
    return chosen[0]


def test_readme_skopeo_example_works_as_written(registry, tmp_path):
    script = (offline_example()
              .replace("127.0.0.1:5000", registry.host)
              .replace("/tmp/", f"{tmp_path}/")
              .replace("./moorage-data/tls", str(registry.cert_dir))  # after /tmp/: it may live there
              .replace(".venv/bin/python", sys.executable))
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                         timeout=240, cwd=README.parent, env=ENV)  # ENV: MOORAGE_ADMIN_PASSWORD
    assert out.returncode == 0, f"{script}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    assert '"Tags": [' in out.stdout and '"v1"' in out.stdout, out.stdout
    assert (tmp_path / "pulled" / "index.json").exists()
