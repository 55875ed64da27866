"""The seam where the batch lane plugs into the gateway."""

from __future__ import annotations

from typing import Protocol

from twolane.v1 import jobs_pb2


class JobService(Protocol):
    """Durable jobs behind SubmitJob, GetResult and CancelJob.

    Implementations raise the typed errors of `twolane.services.errors`
    (NotFoundError for an unknown job id, InvalidArgumentError for a bad
    request, ...); the gateway maps them to status codes.
    """

    async def submit_job(
        self, request: jobs_pb2.SubmitJobRequest
    ) -> jobs_pb2.SubmitJobResponse: ...

    async def get_result(
        self, request: jobs_pb2.GetResultRequest
    ) -> jobs_pb2.GetResultResponse: ...

    async def cancel_job(
        self, request: jobs_pb2.CancelJobRequest
    ) -> jobs_pb2.CancelJobResponse: ...
