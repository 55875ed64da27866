"""The Batch API's state on JetStream: files in an object store, batches in a KV bucket.

Nothing lives in a process's memory, so any HTTP front of a cluster serves any file
or batch, and a batch survives the restart of the process that was running it.

- Object store `twolane_files`: one object per file, named by its id; purpose,
  filename, tenant and creation time ride in the object's headers.
- KV `twolane_batches`: batch id -> BatchRecord (JSON). Every change is a
  revision-checked update, so the API (a cancel) and the process driving the batch
  never overwrite each other, and two processes never both drive one batch: the
  driver holds a lease in the record and renews it.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from pydantic import BaseModel, ConfigDict, Field

from twolane.services import jetstream
from twolane.services.config import JobsConfig
from twolane.services.errors import NotFoundError, UnavailableError

FILES_BUCKET = "twolane_files"
BATCHES_BUCKET = "twolane_batches"
MAX_FILE_BYTES = 200 * 1024 * 1024  # as OpenAI's Batch API
_MAX_UPDATE_TRIES = 16
_HEADER = "Twolane-"

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
FINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})


def _ordered_hex() -> str:
    """32 hex digits that sort in creation order (microseconds, then random): lists
    sort newest first even within one second of `created_at`."""
    return f"{time.time_ns() // 1000:014x}" + secrets.token_hex(9)


def new_file_id() -> str:
    return "file-" + _ordered_hex()


def new_batch_id() -> str:
    return "batch_" + _ordered_hex()


# ---- files --------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    id: str
    tenant: str
    filename: str
    purpose: str
    num_bytes: int
    created_at: int

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.num_bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class FileStore:
    """Files by id, each visible to its tenant only (another's is NotFoundError)."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    async def put(
        self, tenant: str, filename: str, purpose: str, data: bytes, file_id: str | None = None
    ) -> FileInfo:
        """Store `data`; the same `file_id` again replaces it (outputs are written so)."""
        info = FileInfo(
            id=file_id or new_file_id(),
            tenant=tenant,
            filename=filename,
            purpose=purpose,
            num_bytes=len(data),
            created_at=int(time.time()),
        )
        headers = {
            _HEADER + "Tenant": [tenant],
            _HEADER + "Filename": [filename],
            _HEADER + "Purpose": [purpose],
            _HEADER + "Created-At": [str(info.created_at)],
        }
        async with store_errors():
            await self._store.put(info.id, data, meta=api.ObjectMeta(name=info.id, headers=headers))
        return info

    async def info(self, tenant: str, file_id: str) -> FileInfo:
        async with store_errors():
            try:
                found = await self._store.get_info(file_id)
            except nats.js.errors.ObjectNotFoundError:
                raise NotFoundError(f"no file with id {file_id!r}") from None
        info = _file_info(found)
        if info is None or info.tenant != tenant:
            raise NotFoundError(f"no file with id {file_id!r}")
        return info

    async def content(self, tenant: str, file_id: str) -> bytes:
        await self.info(tenant, file_id)
        async with store_errors():
            try:
                result = await self._store.get(file_id)
            except nats.js.errors.ObjectNotFoundError:
                raise NotFoundError(f"no file with id {file_id!r}") from None
        return bytes(result.data or b"")

    async def delete(self, tenant: str, file_id: str) -> None:
        await self.info(tenant, file_id)
        async with store_errors():
            try:
                await self._store.delete(file_id)
            except nats.js.errors.ObjectNotFoundError:
                raise NotFoundError(f"no file with id {file_id!r}") from None

    async def list(self, tenant: str, purpose: str | None = None) -> list[FileInfo]:
        async with store_errors():
            try:
                entries = await self._store.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:
                return []
        infos = [info for entry in entries if (info := _file_info(entry)) is not None]
        return [
            info
            for info in infos
            if info.tenant == tenant and (purpose is None or info.purpose == purpose)
        ]


def _file_info(found: api.ObjectInfo) -> FileInfo | None:
    headers = found.headers or {}

    def header(name: str) -> str:
        value = headers.get(_HEADER + name, [""])
        return value[0] if isinstance(value, list) and value else str(value)

    if found.deleted or not header("Tenant"):
        return None
    return FileInfo(
        id=found.name,
        tenant=header("Tenant"),
        filename=header("Filename"),
        purpose=header("Purpose"),
        num_bytes=found.size or 0,
        created_at=int(header("Created-At") or 0),
    )


# ---- batches ------------------------------------------------------------------------


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchRecord(BaseModel):
    """A batch as stored. Times are Unix seconds, as the API shows them."""

    model_config = ConfigDict(extra="ignore")

    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    status: BatchStatus = "validating"
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    errors: list[BatchError] = Field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict[str, Any] | None = None
    # Who drives the batch, and until when (wall clock) that claim holds unrenewed.
    owner: str = ""
    lease_until_s: float = 0.0

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def set_status(self, status: BatchStatus) -> None:
        self.status = status
        stamp = f"{status}_at"
        if stamp in BatchRecord.model_fields:
            setattr(self, stamp, int(time.time()))

    def to_openai(self) -> dict[str, Any]:
        body = self.model_dump(exclude={"tenant", "owner", "lease_until_s", "errors"})
        body["object"] = "batch"
        body["errors"] = (
            {"object": "list", "data": [e.model_dump() for e in self.errors]}
            if self.errors
            else None
        )
        return body


@dataclass
class StoredBatch:
    record: BatchRecord
    revision: int


class BatchStore:
    """Batch records with revision-checked updates (see the module docstring)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def create(self, record: BatchRecord) -> None:
        async with store_errors():
            await self._kv.create(record.id, record.model_dump_json().encode())

    async def read(self, batch_id: str) -> StoredBatch | None:
        if not _is_batch_id(batch_id):
            return None
        async with store_errors():
            try:
                entry = await self._kv.get(batch_id)
            except nats.js.errors.KeyNotFoundError:
                return None
        assert entry.value is not None and entry.revision is not None
        return StoredBatch(BatchRecord.model_validate_json(entry.value), entry.revision)

    async def require(self, tenant: str, batch_id: str) -> StoredBatch:
        stored = await self.read(batch_id)
        # Another tenant's batch is as unknown as one that never existed.
        if stored is None or stored.record.tenant != tenant:
            raise NotFoundError(f"no batch with id {batch_id!r}")
        return stored

    async def update(
        self, batch_id: str, change: Callable[[BatchRecord], bool]
    ) -> tuple[StoredBatch, bool]:
        """Apply `change` to the latest record, retrying on races; it edits the record in
        place and returns False to leave it unwritten. Returns the record as it stands."""
        for _ in range(_MAX_UPDATE_TRIES):
            stored = await self.read(batch_id)
            if stored is None:
                raise NotFoundError(f"no batch with id {batch_id!r}")
            if not change(stored.record):
                return stored, False
            async with store_errors():
                try:
                    revision = await self._kv.update(
                        batch_id, stored.record.model_dump_json().encode(), last=stored.revision
                    )
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            return StoredBatch(stored.record, revision), True
        raise UnavailableError(f"batch {batch_id} is changing too often to update")

    async def ids(self) -> list[str]:
        async with store_errors():
            try:
                return [key for key in await self._kv.keys() if _is_batch_id(key)]
            except nats.js.errors.NoKeysError:
                return []


def _is_batch_id(batch_id: str) -> bool:
    hex_part = batch_id.removeprefix("batch_")
    return len(hex_part) == 32 and all(c in "0123456789abcdef" for c in hex_part)


@contextlib.asynccontextmanager
async def store_errors() -> AsyncIterator[None]:
    """NATS being away is the caller's UNAVAILABLE, never an internal error."""
    try:
        yield
    # TimeoutError: nats.py's own, or the builtin one some of its paths let through.
    except (TimeoutError, nats.errors.ConnectionClosedError) as exc:
        raise UnavailableError(f"the batch store is unavailable: {exc}") from exc
    except nats.errors.NoRespondersError as exc:
        raise UnavailableError("the batch store is unavailable: JetStream did not answer") from exc


# ---- layout -------------------------------------------------------------------------


async def open_stores(js: JetStreamContext, config: JobsConfig) -> tuple[FileStore, BatchStore]:
    """Create (or update) the object store and the KV bucket; returns their stores."""
    try:
        objects = await js.object_store(FILES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        objects = await js.create_object_store(
            FILES_BUCKET,
            api.ObjectStoreConfig(
                description="Batch API files: inputs, outputs and errors",
                storage=api.StorageType.FILE,
                replicas=config.nats_replicas,
            ),
        )
    batches = jetstream.bucket(
        BATCHES_BUCKET, config.record_ttl_s, "Batch API batches by id", config.nats_replicas
    )
    await jetstream.ensure_stream(js, batches)
    return FileStore(objects), BatchStore(await js.key_value(BATCHES_BUCKET))
