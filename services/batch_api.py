"""The OpenAI Files and Batch API routes, served from JetStream (see batch_store.py).

`/v1/files` keeps files in the object store; `/v1/batches` writes batch records that a
BatchRunner (in this process or another front's) drives to their end. The routes only
read and write records, so any front of a cluster answers for any batch. Each caller
sees only its tenant's files and batches (another's are 404, as if they did not
exist); creating and cancelling batches and reading files go to the audit log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import structlog
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from twolane.services.audit import AuditLog
from twolane.services.auth import current_principal
from twolane.services.batch_runner import BatchRunner
from twolane.services.batch_store import (
    MAX_FILE_BYTES,
    BatchRecord,
    BatchStore,
    FileStore,
    new_batch_id,
)
from twolane.services.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)
from twolane.services.openai_api import json_response, openai_errors
from twolane.services.openai_schema import CreateBatchRequest, parse

log = structlog.get_logger(__name__)

COMPLETION_WINDOW_S = 24 * 3600
DEFAULT_PAGE = 20  # batches
MAX_PAGE = 100
DEFAULT_FILES_PAGE = 10_000  # files, as OpenAI's
MAX_FILES_PAGE = 10_000
MAX_METADATA_PAIRS = 16
_UPLOAD_PURPOSES = ("batch",)
_CANCELLABLE = ("validating", "in_progress")


class BatchAPI:
    def __init__(
        self,
        files: FileStore,
        batches: BatchStore,
        runner: BatchRunner,
        audit: AuditLog | None = None,
    ) -> None:
        self.files = files
        self.batches = batches
        self.runner = runner
        self.audit = audit

    @contextlib.contextmanager
    def _audited(self, operation: str, resource_id: str) -> Iterator[None]:
        """Record `operation` on `resource_id` (a batch or file id) and its outcome."""
        try:
            yield
        except Exception as exc:
            if self.audit is not None:
                self.audit.record(operation, current_principal(), resource_id, type(exc).__name__)
            raise
        if self.audit is not None:
            self.audit.record(operation, current_principal(), resource_id, "ok")

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload_file, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel_batch, methods=["POST"]),
        ]

    # ---- files ---------------------------------------------------------------------

    @openai_errors
    async def upload_file(self, request: Request) -> Response:
        tenant = current_principal().tenant
        async with request.form(max_files=1, max_fields=4) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            problems = []
            if not isinstance(upload, UploadFile):
                problems.append(FieldViolation("file", "required: the file, as a multipart part"))
            if purpose not in _UPLOAD_PURPOSES:
                problems.append(
                    FieldViolation("purpose", f"must be one of {', '.join(_UPLOAD_PURPOSES)}")
                )
            if problems:
                raise InvalidArgumentError(problems)
            assert isinstance(upload, UploadFile)
            data = await upload.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise InvalidArgumentError(
                    [FieldViolation("file", f"at most {MAX_FILE_BYTES} bytes")]
                )
            info = await self.files.put(tenant, upload.filename or "file", str(purpose), data)
        log.info("file stored", file_id=info.id, num_bytes=info.num_bytes, tenant=tenant)
        return json_response(info.to_openai())

    @openai_errors
    async def list_files(self, request: Request) -> Response:
        tenant = current_principal().tenant
        """Newest first (`order=asc`: oldest), `limit` at a time, the page after `after`:
        cursor pages, as the SDK's iterator expects (it follows `has_more`)."""
        tenant = current_principal().tenant
        infos = await self.files.list(tenant, request.query_params.get("purpose"))
        newest_first = request.query_params.get("order", "desc") != "asc"
        infos.sort(key=lambda info: (info.created_at, info.id), reverse=newest_first)
        page, has_more = _page(
            [i.to_openai() for i in infos],
            request.query_params.get("after"),
            _limit(request.query_params.get("limit"), DEFAULT_FILES_PAGE, MAX_FILES_PAGE),
            "file",
        )
        return json_response(_list_body(page, has_more))

    @openai_errors
    async def get_file(self, request: Request) -> Response:
        tenant = current_principal().tenant
        info = await self.files.info(tenant, request.path_params["file_id"])
        return json_response(info.to_openai())

    @openai_errors
    async def file_content(self, request: Request) -> Response:
        tenant = current_principal().tenant
        file_id = request.path_params["file_id"]
        with self._audited("file_content", file_id):
            data = await self.files.content(tenant, file_id)
        return Response(data, media_type="application/jsonl")

    @openai_errors
    async def delete_file(self, request: Request) -> Response:
        tenant = current_principal().tenant
        file_id = request.path_params["file_id"]
        await self.files.delete(tenant, file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    # ---- batches -------------------------------------------------------------------

    @openai_errors
    async def create_batch(self, request: Request) -> Response:
        tenant = current_principal().tenant
        body = parse(CreateBatchRequest, await request.body())
        if body.metadata is not None and len(body.metadata) > MAX_METADATA_PAIRS:
            raise InvalidArgumentError(
                [FieldViolation("metadata", f"at most {MAX_METADATA_PAIRS} pairs")]
            )
        try:
            info = await self.files.info(tenant, body.input_file_id)
        except NotFoundError:
            raise NotFoundError(f"input_file_id: no file with id {body.input_file_id!r}") from None
        if info.purpose != "batch":
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "input_file_id", f"the file's purpose is {info.purpose!r}, not batch"
                    )
                ]
            )
        now_s = int(time.time())
        record = BatchRecord(
            id=new_batch_id(),
            tenant=tenant,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
            created_at=now_s,
            expires_at=now_s + COMPLETION_WINDOW_S,
        )
        with self._audited("batch_create", record.id):
            await self.batches.create(record)
        await self.runner.nudge(record.id)
        log.info("batch created", batch_id=record.id, endpoint=record.endpoint, tenant=tenant)
        return json_response(record.to_openai())

    @openai_errors
    async def get_batch(self, request: Request) -> Response:
        tenant = current_principal().tenant
        stored = await self.batches.require(tenant, request.path_params["batch_id"])
        return json_response(stored.record.to_openai())

    @openai_errors
    async def list_batches(self, request: Request) -> Response:
        """Newest first, `limit` at a time, the page after the batch `after`."""
        tenant = current_principal().tenant
        limit = _limit(request.query_params.get("limit"), DEFAULT_PAGE, MAX_PAGE)
        records = []
        for batch_id in await self.batches.ids():
            stored = await self.batches.read(batch_id)
            if stored is not None and stored.record.tenant == tenant:
                records.append(stored.record)
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        page, has_more = _page(
            [r.to_openai() for r in records], request.query_params.get("after"), limit, "batch"
        )
        return json_response(_list_body(page, has_more))

    @openai_errors
    async def cancel_batch(self, request: Request) -> Response:
        tenant = current_principal().tenant
        batch_id = request.path_params["batch_id"]
        await self.batches.require(tenant, batch_id)
        refused = ""

        def cancel(record: BatchRecord) -> bool:
            nonlocal refused
            if record.status == "cancelling":
                return False
            if record.status not in _CANCELLABLE:
                refused = record.status
                return False
            record.set_status("cancelling")
            return True

        with self._audited("batch_cancel", batch_id):
            stored, changed = await self.batches.update(batch_id, cancel)
            if refused:
                raise FailedPreconditionError(f"cannot cancel a batch that is {refused}")
        if changed:
            await self.runner.nudge(batch_id)
            log.info("batch cancelling", batch_id=batch_id)
        return json_response(stored.record.to_openai())


def _limit(raw: str | None, default: int, most: int) -> int:
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise InvalidArgumentError([FieldViolation("limit", f"must be in [1, {most}]")])
    return limit


def _page(
    items: list[dict[str, Any]], after: str | None, limit: int, kind: str
) -> tuple[list[dict[str, Any]], bool]:
    """The `limit` items after the one with id `after` (all from the first without it),
    and whether more follow."""
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise NotFoundError(f"after: no {kind} with id {after!r}")
        items = items[ids.index(after) + 1 :]
    return items[:limit], len(items) > limit


def _list_body(page: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": has_more,
    }
