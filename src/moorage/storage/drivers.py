"""Which blob driver serves a storage location.

A replica, `moorage join` (proving it sees the cluster's storage) and
`moorage restore` open the cluster's storage here, never a driver class of
their own: a directory is the filesystem driver's, `s3://BUCKET[/PREFIX]`
the S3 driver's (storage/s3/), with the store's options beside it
(`S3_OPTIONS`: endpoint, region, CA file, path-style). Neither holds a
secret: credentials come from the AWS chain inside the driver, so a
location and its options may be saved in replica.json and handed to a
joining replica as they are. A replica's driver is timed
(storage/instrumented.py), whichever it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moorage.metrics import Metrics
from moorage.storage.base import BlobDriver
from moorage.storage.filesystem import FilesystemDriver
from moorage.storage.instrumented import InstrumentedDriver
from moorage.storage.s3.config import S3Config
from moorage.storage.s3.driver import S3Driver

S3_OPTIONS = ("endpoint", "region", "ca_cert", "path_style")


def is_object_store(location: Path | str) -> bool:
    return str(location).startswith("s3://")


def storage_at(location: Path | str, options: Mapping[str, Any] | None = None,
               metrics: Metrics | None = None) -> BlobDriver:
    """The driver for `location`, not yet opened (`await driver.open()`, later `close()`);
    with `metrics`, every action it takes is timed and its failures counted.
    StorageMisconfigured (one sentence) for an s3:// location that cannot be one."""
    driver: BlobDriver
    if is_object_store(location):
        driver = S3Driver(s3_config(str(location), options))
    else:
        driver = FilesystemDriver(Path(location))
    if metrics is not None:
        driver = InstrumentedDriver(driver, metrics)
    return driver


def s3_config(location: str, options: Mapping[str, Any] | None = None) -> S3Config:
    given = {k: v for k, v in (options or {}).items() if k in S3_OPTIONS and v not in (None, "")}
    return S3Config.from_url(location, **given)


def describe(location: Path | str, options: Mapping[str, Any] | None = None) -> str:
    """The storage as a sentence names it: a directory, or `s3://b/p at ENDPOINT`."""
    if is_object_store(location):
        return f"{location} at {(options or {}).get('endpoint') or 'AWS S3'}"
    return str(location)
