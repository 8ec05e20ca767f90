"""Where attachments' bytes live (``base.ObjectStore``), opened from the media config by one factory.

::

    config.media.backend ──▶ open_object_store(config.media, data_dir)
        ├─ "local" ──▶ LocalObjectStore(media_dir or DATA_DIR/media)      files, renamed into place
        └─ "s3" ─────▶ S3ObjectStore(endpoint, region, bucket, keys)       multipart uploads;
                         spooled through DATA_DIR/media-spool              needs aiobotocore (mqchat[s3])

    media service ──begin / append / finish / abort──▶ ObjectStore ──(offset, staging)──▶ media index
                  ──read / size / delete / presigned_get / presigned_put──▶ ObjectStore

``transfer.py`` holds what both backends share: an upload's chunks in batches (a cut ends them
cleanly), files worked in threads, and the check of a key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mqchat.config import MediaConfig
from mqchat.errors import ConfigError
from storage.objects.base import ObjectStore, ObjectStoreError, PresignedPut, Record, UploadLost
from storage.objects.local import LocalObjectStore

__all__ = [
    "LocalObjectStore",
    "ObjectStore",
    "ObjectStoreError",
    "PresignedPut",
    "Record",
    "UploadLost",
    "open_object_store",
]


@asynccontextmanager
async def open_object_store(
    config: MediaConfig, data_dir: Path, *, create_bucket: bool = False
) -> AsyncIterator[ObjectStore]:
    """The object store config names, open until the block ends. create_bucket: an S3 bucket
    that does not exist is created (development and tests) instead of refused."""
    store: ObjectStore
    if config.backend == "local":
        store = LocalObjectStore(Path(config.directory) if config.directory else data_dir / "media")
    elif config.backend == "s3":
        try:
            from storage.objects.s3 import S3ObjectStore
        except ImportError as exc:
            raise ConfigError(
                f"media_backend = s3 needs aiobotocore ({exc.name} is missing): pip install 'mqchat[s3]'"
            ) from exc
        s3 = S3ObjectStore(
            endpoint=config.s3_endpoint,
            region=config.s3_region,
            bucket=config.s3_bucket,
            access_key=config.s3_access_key,
            secret_key=config.s3_secret_key,
            create_bucket=create_bucket,
            spool_dir=data_dir / "media-spool",
        )
        await s3.open()
        store = s3
    else:
        raise ConfigError(f"unknown media backend {config.backend!r}")
    try:
        yield store
    finally:
        await store.aclose()
