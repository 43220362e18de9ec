"""The S3 blob driver: blobs and upload sessions in one bucket of any S3-compatible store.

One job a module, bottom up (each imports only those before it):

    config.py     S3Config: where the blobs live and how patient to be; S3's size limits
    failures.py   what a failed call means: retry it, or which storage error to raise
    client.py     S3Client: object calls (put, get, head, list, delete, presign) under
                  one deadline-and-retry policy
    multipart.py  S3 multipart uploads at a key (create, parts, complete, abort, list)
    uploads.py    upload sessions: one multipart upload each, appended from any replica,
                  completed in place once the digest is verified (never copied)
    driver.py     S3Driver, the BlobDriver (storage/base.py) the layers above see

The client is aiobotocore. bench/s3_clients.py measured it against obstore
(the Rust object_store): obstore is several times cheaper per request, but it
cannot resume a multipart upload by its id, list multipart uploads, or read
the shared credentials file, and an upload session whose requests land on
different replicas needs all of those. The hot paths
do not reach S3 (HEAD and manifest GET come from the index; blob GET is a
redirect to a presigned URL), so per-request cost matters less than reach.

Layout under the configured prefix (distribution's
`docker/registry/v2/blobs/sha256/ab/<hex>/data` nests one level more for no
gain on S3, which partitions by key prefix itself):

    blobs/<algorithm>/<2 hex>/<hex>   a blob under 5 MiB, at its content address
    blobs/u/<upload id>               a blob of 5 MiB or more: its upload session's multipart
                                      upload, completed in place (the blob record's location)
    uploads/<upload id>/at-<offset>   an upload session's state at an offset (parts, tail)
    cluster/join-<id>                 a joining replica's proof
    audit/<replica>/<day>/...         the audit log (registry/audit.py)
    probe/<nonce>                     the start-up probe, deleted at once

Only `uploads/` and multipart uploads in progress under `blobs/` are ever
listed (GC of crashed uploads); blobs themselves are found through etcd.
"""
