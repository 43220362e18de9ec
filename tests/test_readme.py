"""The README's offline skopeo example, run as written against a real replica.

Only the registry address and the scratch paths are swapped for the test's
own, so the documented commands cannot rot.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ADMIN_PASSWORD, ENV

pytestmark = pytest.mark.clients

README = Path(__file__).resolve().parent.parent / "README.md"


def example(marker: str) -> str:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    chosen = [b for b in blocks if marker in b]
    assert len(chosen) == 1, f"the README should have one example with {marker!r}"
    return chosen[0]


def offline_example() -> str:
    block = example("oci:/tmp/hello-layout")
    assert "tls-verify=false" not in block, "the example should verify the registry's certificate"
    return block


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


def test_readme_permissions_example_works_as_written(registry, tmp_path):
    script = re.sub(r"^moorage ", f"{sys.executable} -m moorage ", example("moorage user add alice"), flags=re.M)
    script = (script.replace("https://127.0.0.1:5000", registry.url)
              .replace("./moorage-data/tls/ca.crt", str(registry.ca)))
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env={**ENV, "MOORAGE_ADMIN_PASSWORD": ADMIN_PASSWORD})
    assert out.returncode == 0, f"{script}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    listed = json.loads(out.stdout[out.stdout.rindex("\n{") + 1:])  # the last command's --json
    assert "alice" in [u["name"] for u in listed["users"]], listed
    assert "push" in out.stdout  # perm check: alice may push to ci/app through her team
