"""Where distribution 2.8 keeps things in its storage (its storage/paths.go), for seeding it directly.

The bench writes content straight into distribution's bucket where pushing
it would take too long (the GC comparison's 100,000 blobs) or cannot work
(distribution 2.8 cannot upload an empty blob to SeaweedFS: it completes a
multipart upload of no parts, which the store refuses with NoSuchUpload).
"""

from __future__ import annotations


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _v2(root: str) -> str:
    """Keys under `rootdirectory` (no leading slash: S3 keys; "" for the bucket's top)."""
    return f"{root.strip('/')}/docker/registry/v2".lstrip("/")


def blob_data(root: str, digest: str) -> str:
    h = _hex(digest)
    return f"{_v2(root)}/blobs/sha256/{h[:2]}/{h}/data"


def _repo(root: str, repo: str) -> str:
    return f"{_v2(root)}/repositories/{repo}"


def layer_link(root: str, repo: str, digest: str) -> str:
    return f"{_repo(root, repo)}/_layers/sha256/{_hex(digest)}/link"


def revision_link(root: str, repo: str, digest: str) -> str:
    return f"{_repo(root, repo)}/_manifests/revisions/sha256/{_hex(digest)}/link"


def tag_links(root: str, repo: str, tag: str, digest: str) -> list[str]:
    """The tag's current link and its index entry."""
    return [f"{_repo(root, repo)}/_manifests/tags/{tag}/current/link",
            f"{_repo(root, repo)}/_manifests/tags/{tag}/index/sha256/{_hex(digest)}/link"]
