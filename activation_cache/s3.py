"""S3 (or any S3-compatible store: MinIO, Ceph, SeaweedFS) behind the ``ObjectStore`` protocol.

The only module in the project that imports boto3. Endpoint, region and credentials come from the
standard AWS settings (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``~/.aws/config``) unless ``endpoint_url`` /
``region`` are given. Credentials never live on the store object: it pickles to its URI and
options, and each process builds its own client on first use.

Every request is tried up to ``max_attempts`` times (botocore's "standard" retries: dropped
connections, 5xx, throttling; a GET whose body breaks off is read again here); then the
operation raises ``StoreError`` naming the object, the operation and the error code. A full
store (507, quota exceeded) is reported at once, not retried.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from activation_cache.store_protocol import (
    ObjectNotFound,
    StoreError,
    StoreFull,
    check_key,
    join_uri,
)

logger = logging.getLogger(__name__)

_MIN_PART_BYTES = 8 * 2**20
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket", "NotFound", "404"})
_CONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
# botocore retries failed requests, but not a response body that breaks off while being read.
_BODY_READ_ERRORS = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
)
# What botocore's "standard" mode retries besides 5xx replies (botocore.retries.standard).
_TRANSIENT_ERRORS = (BotoConnectionError, HTTPClientError)
# A full store: MinIO's full drives (507), its bucket quota, Ceph RGW's quota (403). Not retried:
# space does not come back within a request's back-off, so the first refusal is reported at once.
_FULL_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded",
                         "InsufficientStorage", "507"})
_BODY_RETRY_BASE_S = 0.05  # botocore's back-off base for errors other than throttling


class S3Store:
    """Objects under ``s3://bucket/prefix``; keys are ``/``-separated paths below the prefix."""

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 8,
        multipart_threshold_bytes: int = 64 * 2**20,
    ):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"S3 uri {uri!r} must look like s3://bucket/prefix")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be at least 1")
        if multipart_threshold_bytes < 1:
            raise ValueError(
                f"multipart_threshold_bytes={multipart_threshold_bytes} must be positive"
            )
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = join_uri(f"s3://{self.bucket}", self.prefix)
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_attempts = max_attempts
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self._lock = threading.Lock()
        self._session: boto3.session.Session | None = None
        self._client: Any = None
        self._bucket_seen = False

    # -- client -----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use (per process: it is not pickled)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._session, self._client = self._make_client()
        return self._client

    def _make_client(self) -> tuple[boto3.session.Session, Any]:
        # A session per store: boto3 sessions are not thread-safe, clients are.
        session = boto3.session.Session()
        # "standard": exponential back-off with jitter on throttling, 5xx and connection errors;
        # "adaptive" would add client-side rate limiting, which botocore still calls experimental.
        # total_max_attempts counts the first try; botocore's "max_attempts" would count only retries.
        config = Config(retries={"total_max_attempts": self.max_attempts, "mode": "standard"})
        client = session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )
        logger.debug("S3 client for %s at %s", self.uri, client.meta.endpoint_url)
        return session, client

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_session", "_client"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._session = None
        self._client = None

    # -- keys and errors --------------------------------------------------------------------

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, s3_key: str | None) -> str:
        return f"s3://{self.bucket}/{s3_key}" if s3_key else self.uri

    def _error(self, op: str, s3_key: str | None, exc: Exception, *, attempts: int | None = None) -> StoreError:
        """One line naming the object, the operation, the error code and the attempts spent."""
        where = self._where(s3_key)
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            metadata = exc.response.get("ResponseMetadata", {})
            status = metadata.get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
            if code in _NOT_FOUND_CODES and s3_key is not None:
                return ObjectNotFound(f"{where}: no such object")
            detail = f"{code} (HTTP {status}): {error.get('Message', '')}".rstrip(": ")
            if code in _FULL_CODES or status == 507:
                message = f"{where}: {op} refused: bucket {self.bucket!r} is full (free space, then run again): {detail}"
                return StoreFull(self._redact(" ".join(message.split())))
            attempts = metadata.get("RetryAttempts", 0) + 1
            spent = f" after {attempts} attempts" if attempts > 1 else ""
        else:
            detail = f"{type(exc).__name__}: {exc}"
            if attempts is None and isinstance(exc, _TRANSIENT_ERRORS):
                attempts = self.max_attempts  # botocore retried it up to the budget
            spent = f" after {attempts} attempts" if attempts and attempts > 1 else ""
        return StoreError(self._redact(" ".join(f"{where}: {op} failed{spent}: {detail}".split())))

    def _redact(self, message: str) -> str:
        """Blank out the credentials in use, should a server or library ever echo them."""
        credentials = self._session.get_credentials() if self._session is not None else None
        if credentials is None:
            return message
        frozen = credentials.get_frozen_credentials()
        for secret in (frozen.secret_key, frozen.access_key, frozen.token):
            if secret and len(secret) >= 4:
                message = message.replace(secret, "***")
        return message

    def _bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _NO_BUCKET_CODES:
                return False
            raise self._error("head_bucket", None, exc) from exc
        except BotoCoreError as exc:
            raise self._error("head_bucket", None, exc) from exc
        return True

    def _check_bucket(self) -> None:
        """Raise StoreError if the bucket is missing (HEAD object cannot tell bucket from key)."""
        if not self._bucket_seen:
            if not self._bucket_exists():
                raise StoreError(f"{self.uri}: bucket {self.bucket!r} does not exist")
            self._bucket_seen = True

    # -- ObjectStore ------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        s3_key = self._key(key)
        try:
            if len(data) < self.multipart_threshold_bytes:
                # One PUT: the object appears whole or not at all.
                self.client.put_object(Bucket=self.bucket, Key=s3_key, Body=data)
            else:
                # Multipart is atomic too: the object appears only when the upload completes.
                logger.debug("multipart upload of %d bytes to %s", len(data), self._where(s3_key))
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, s3_key, Config=self._transfer_config()
                )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("put", s3_key, exc) from exc

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.multipart_threshold_bytes,
            multipart_chunksize=max(_MIN_PART_BYTES, self.multipart_threshold_bytes // 4),
        )

    def get_bytes(self, key: str) -> bytes:
        return self._read_object(self._key(key))[0]

    def _read_object(self, s3_key: str) -> tuple[bytes, str]:
        """The whole object and its ETag; a body that breaks off is read again (botocore's
        retries end once the reply's head has arrived)."""
        attempt = 1
        while True:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=s3_key)
            except (ClientError, BotoCoreError) as exc:
                raise self._error("get", s3_key, exc) from exc
            try:
                return response["Body"].read(), response.get("ETag", "")
            except _BODY_READ_ERRORS as exc:
                if attempt >= self.max_attempts:
                    raise self._error("get", s3_key, exc, attempts=attempt) from exc
                logger.warning("%s: read broke off (%s), retrying", self._where(s3_key), exc)
                # The same jittered exponential back-off botocore gives a failed request.
                time.sleep(random.random() * min(_BODY_RETRY_BASE_S * 2 ** (attempt - 1), 20.0))
                attempt += 1

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        return self._read_object(self._key(key))

    def put_if(self, key: str, data: bytes, *, version: str | None) -> str | None:
        # S3 conditional writes (If-None-Match / If-Match, AWS since 2024; MinIO, SeaweedFS).
        s3_key = self._key(key)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=s3_key, Body=data, **condition)["ETag"]
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in _CONDITION_FAILED_CODES:
                raise self._error("conditional put", s3_key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("conditional put", s3_key, exc) from exc
        # A retried request whose first attempt landed fails its own condition: the object then
        # holds exactly our bytes, and the write did happen.
        try:
            stored, etag = self.get_versioned(key)
        except ObjectNotFound:
            return None
        return etag if stored == data else None

    def exists(self, key: str) -> bool:
        s3_key = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=s3_key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in _NOT_FOUND_CODES:
                self._check_bucket()
                return False
            raise self._error("exists", s3_key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("exists", s3_key, exc) from exc
        return True

    def list(self, prefix: str = "") -> list[str]:
        # Like a directory: list("a") covers "a/x" but not "ab/x".
        sub = prefix.strip("/")
        parts = [p for p in (self.prefix, sub) if p]
        s3_prefix = "/".join(parts) + "/" if parts else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=s3_prefix
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    if not entry["Key"].endswith("/"):  # folder markers some tools create
                        keys.append(entry["Key"][strip:])
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", s3_prefix or None, exc) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        s3_key = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=s3_key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("delete", s3_key, exc) from exc

    def child(self, prefix: str) -> S3Store:
        store = S3Store(
            join_uri(self.uri, check_key(prefix)),
            endpoint_url=self.endpoint_url,
            region=self.region,
            max_attempts=self.max_attempts,
            multipart_threshold_bytes=self.multipart_threshold_bytes,
        )
        # Share the client (thread-safe, holds the connection pool) with the parent.
        store._session, store._client = self._session, self._client
        store._bucket_seen = self._bucket_seen
        return store

    # -- buckets ----------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (an existing one of ours is fine)."""
        if self._bucket_exists():
            self._bucket_seen = True
            return
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {}
        # us-east-1 is the default location and AWS rejects it as an explicit constraint.
        if region and region not in ("us-east-1", "aws-global"):
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code != "BucketAlreadyOwnedByYou":
                raise self._error("create_bucket", None, exc) from exc
        except BotoCoreError as exc:
            raise self._error("create_bucket", None, exc) from exc
        self._bucket_seen = True
        logger.info("created bucket %r", self.bucket)

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store({self.uri!r}{endpoint})"
