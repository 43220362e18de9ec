"""What a failed S3 call means: whether to try it again, and the storage error it becomes.

Connection errors, timeouts, 500/502/503/504 and SlowDown are worth another
attempt (StorageUnavailable once the attempts are spent); everything else is
the storage layer's own error (storage/errors.py) at once, one sentence
naming the store and what failed, never a credential.
"""

from __future__ import annotations

import re

import aiohttp
import botocore.exceptions as bce

from moorage.storage.errors import (
    ObjectMissing,
    StorageError,
    StorageMisconfigured,
    StorageUnavailable,
    UploadInvalid,
)
from moorage.storage.s3.config import S3Config

_RETRY_CODES = {"500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable",
                "RequestTimeout", "RequestTimeoutException", "ThrottlingException", "Throttling",
                "RequestLimitExceeded", "TooManyRequestsException"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_BAD_KEY_CODES = {"InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}
_UPLOAD_CODES = {"NoSuchUpload", "EntityTooSmall", "EntityTooLarge", "InvalidPart", "InvalidPartOrder"}
NETWORK_ERRORS = (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError,
                  aiohttp.ClientError, OSError, TimeoutError)


def translate(config: S3Config, e: Exception, what: str) -> tuple[bool, StorageError]:
    """(retry?, the error to raise if not) for a call that failed trying to `what`."""
    where = config.where
    if isinstance(e, bce.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        retry, error = _client_error(where, code, str(err.get("Message") or "")[:200], what)
        error.code = code
        return retry, error
    if isinstance(e, bce.SSLError):
        m = re.search(r"(certificate verify failed: [^(]+?)\s*\(", str(e))
        reason = m.group(1) if m else type(e).__name__
        return False, StorageMisconfigured(
            f"TLS with the object store at {config.endpoint} failed ({reason}); "
            "give its CA with --s3-ca-cert")
    if isinstance(e, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
        return False, StorageMisconfigured(
            "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or a shared credentials file or profile")
    if isinstance(e, NETWORK_ERRORS):
        reason = type(e).__name__ if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        return True, StorageUnavailable(f"cannot reach the object store ({where}) to {what}: {reason[:200]}")
    return False, StorageError(f"the object store ({where}) failed to {what}: {e!r}"[:400])


def _client_error(where: str, code: str, message: str, what: str) -> tuple[bool, StorageError]:
    """The store answered with an error `code`: what it means here."""
    if code in _RETRY_CODES:
        return True, StorageUnavailable(f"the object store ({where}) failed to {what}: {code}")
    if code in _MISSING_CODES:
        return False, ObjectMissing(f"cannot {what}: no such object in {where}")
    if code == "NoSuchBucket":
        return False, StorageMisconfigured(f"{where}: the bucket does not exist")
    if code in _BAD_KEY_CODES:
        return False, StorageMisconfigured(
            f"{where} does not know the access key in use ({code}): check the AWS credentials "
            "(AWS_ACCESS_KEY_ID, the shared credentials file or the profile)")
    if code == "SignatureDoesNotMatch":
        return False, StorageMisconfigured(
            f"{where} refused the signature of the request ({code}): the secret access key "
            "does not match the access key")
    if code in ("AccessDenied", "403", "AllAccessDisabled"):
        return False, StorageMisconfigured(
            f"{where} refused to let these credentials {what} ({code}): check the credentials "
            "and the bucket policy")
    if code in _UPLOAD_CODES:
        return False, UploadInvalid(f"the object store refused to {what}: {code}")
    return False, StorageError(f"the object store ({where}) refused to {what}: {code} {message}".rstrip())
