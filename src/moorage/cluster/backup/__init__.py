"""Backup and restore: an archive out of a live cluster, and a new cluster of one from it.

    archive.py    the archive's format: writing it, checking all of it, reading it back
    snapshot.py   the replica's side of a backup: a consistent etcd snapshot, the blobs it knows
    restore.py    a new cluster of one from a checked archive (etcd's own snapshot restore)
    blobs.py      the archive's blobs, back into the storage through the blob driver

`moorage backup` and `moorage restore` (cli/backup.py) drive them; the
replica's admin API serves the snapshot and the blobs (api/backup.py).
"""
