"""The README's examples, run as written against a real replica, and docs/architecture.md's map.

The examples run in a directory laid out like a checkout after `make run`
(./moorage-data being the test replica's); only the registry's address and
the scratch paths are swapped for the test's own, so the documented commands
cannot rot.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ENV

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


@pytest.fixture
def checkout(registry, tmp_path) -> Path:
    """A directory like the checkout after `make run`: the virtualenv, the tests' helpers, and
    ./moorage-data, here the test replica's. The README's commands run in it as printed."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in (".venv", "tests"):
        (work / name).symlink_to(README.parent / name)
    (work / "moorage-data").symlink_to(registry.data_dir)
    return work


def run_as_written(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k not in ("MOORAGE_USERNAME", "MOORAGE_PASSWORD")}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                         timeout=240, cwd=cwd, env=env, stdin=subprocess.DEVNULL)  # ENV: MOORAGE_ADMIN_PASSWORD
    assert out.returncode == 0, f"{script}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    return out


def test_readme_skopeo_example_works_as_written(registry, checkout, tmp_path):
    # Only the registry's address and the scratch directory differ from the README.
    script = offline_example().replace("127.0.0.1:5000", registry.host).replace("/tmp/", f"{tmp_path}/")
    out = run_as_written(script, checkout)
    assert '"Tags": [' in out.stdout and '"v1"' in out.stdout, out.stdout
    assert (tmp_path / "pulled" / "index.json").exists()


def test_readme_permissions_example_works_as_written(registry, checkout):
    script = example("moorage user add alice")
    assert "--existing" not in script and "127.0.0.1" not in script  # on the node, nothing to swap
    out = run_as_written(script, checkout)
    listed = json.loads(out.stdout[out.stdout.rindex("\n{") + 1:])  # the last command's --json
    assert "alice" in [u["name"] for u in listed["users"]], listed
    assert "push" in out.stdout  # perm check: alice may push to ci/app through her team
    assert not list(checkout.glob("*.pw")), "the example left a password in the work tree"


ARCHITECTURE = README.parent / "docs" / "architecture.md"


def test_architecture_names_every_module_and_only_modules_that_exist():
    """docs/architecture.md stays the map of the code: what it names exists, and it names every module."""
    doc = ARCHITECTURE.read_text()
    root = README.parent
    named = set(re.findall(r"`(src/moorage/[\w/]*(?:\.py|/))`", doc))
    # The layers table names modules relative to the package at the start of their row.
    for package, cells in re.findall(r"^\| \w+ \| `(src/moorage/\w+/)` \|(.*)\|$", doc, re.M):
        named |= {package + m for m in re.findall(r"`(\w+\.py)`", cells)}
    missing = sorted(p for p in named if not (root / p).exists())
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"
    modules = {str(p.relative_to(root)) for p in (root / "src" / "moorage").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    unnamed = sorted(modules - named)
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"


def test_architecture_shows_the_etcd_key_layout_of_meta_keys():
    from moorage.meta import keys
    doc = ARCHITECTURE.read_text()
    shown = set(re.findall(r"^\| `(/moorage/[^`]*)` \|", doc, re.M))
    prefixes = {v.decode() for k, v in vars(keys).items() if k.isupper() and isinstance(v, bytes)}
    for prefix in prefixes - {"/moorage/", "/moorage/grant/", "/moorage/gc/"}:
        assert any(key.startswith(prefix) for key in shown), f"no key under {prefix} in docs/architecture.md"
    for key in shown:
        assert any(key.startswith(p) for p in prefixes - {"/moorage/"}), f"{key} is not in meta/keys.py"
