"""The ``bulk_export_job`` rows: create, read, progress, finish, fail, cancel, expire.

States: ``queued`` → ``running`` → ``completed`` | ``failed``; ``cancelled`` by the client (DELETE),
which also removes the files. A worker writes ``heartbeat`` at least every
:data:`HEARTBEAT_SECONDS`; a queued or running job whose heartbeat is older than the stale limit
was interrupted (the server stopped or restarted): :func:`reap` marks it ``failed`` with that
reason and removes its partial files, so the client gets a clear error and kicks off again (a
job is not resumed: an export is a snapshot at its transaction time, and a new kick-off is cheap).
Completed, failed and cancelled jobs are deleted with their files once ``expires`` has passed.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import orjson
from sqlalchemy import delete, insert, or_, select, update

from fhir_iop.store.models import bulk_export_job as T
from fhir_iop.store.repository import now

HEARTBEAT_SECONDS = 5
ACTIVE = ("queued", "running")


@dataclass
class Job:
    id: str
    client: str
    access: dict
    request: str
    params: dict
    state: str
    progress: str | None
    files: list[dict]
    error: list[dict]
    transaction_time: datetime | None
    created: datetime
    heartbeat: datetime | None
    expires: datetime | None

    @classmethod
    def of(cls, row) -> Job:
        return cls(row.id, row.client, orjson.loads(row.access), row.request, orjson.loads(row.params), row.state,
                   row.progress, orjson.loads(row.files or b"[]"), orjson.loads(row.error or b"[]"),
                   row.transaction_time, row.created, row.heartbeat, row.expires)


def create(store, client: str, access: dict, request: str, params: dict) -> Job:
    when = now()
    job_id = uuid.uuid4().hex
    with store.transaction() as tx:
        tx.conn.execute(insert(T).values(id=job_id, client=client, access=orjson.dumps(access).decode(),
                                         request=request, params=orjson.dumps(params).decode(), state="queued",
                                         progress="queued", created=when, heartbeat=when))
    return get(store, job_id)


def get(store, job_id: str) -> Job | None:
    with store.reading() as tx:
        row = tx.conn.execute(select(T).where(T.c.id == job_id)).first()
    return Job.of(row) if row else None


def _set(store, job_id: str, *only_in: str, **values) -> bool:
    """Update a job (only while in one of the states ``only_in``, when given); whether a row changed."""
    stmt = update(T).where(T.c.id == job_id)
    if only_in:
        stmt = stmt.where(T.c.state.in_(only_in))
    with store.transaction() as tx:
        return tx.conn.execute(stmt.values(**values)).rowcount == 1


def start(store, job_id: str, transaction_time: datetime) -> bool:
    return _set(store, job_id, "queued", state="running", transaction_time=transaction_time, heartbeat=now(),
                progress="started")


def beat(store, job_id: str, progress: str) -> bool:
    """Progress and heartbeat; False once the job is no longer running (cancelled): the worker stops."""
    return _set(store, job_id, "running", progress=progress[:255], heartbeat=now())


def finish(store, job_id: str, files: list[dict], errors: list[dict], ttl: int) -> bool:
    when = now()
    return _set(store, job_id, "running", state="completed", progress="completed", heartbeat=when,
                files=orjson.dumps(files).decode(), error=orjson.dumps(errors).decode(),
                expires=when + timedelta(seconds=ttl))


def fail(store, job_id: str, message: str, ttl: int) -> bool:
    when = now()
    return _set(store, job_id, *ACTIVE, state="failed", progress="failed", heartbeat=when,
                error=orjson.dumps([message]).decode(), expires=when + timedelta(seconds=ttl))


def cancel(store, job_id: str, directory: Path) -> bool:
    """Cancel (or, once finished, delete) a job; its files go at once, its row is gone."""
    with store.transaction() as tx:
        done = tx.conn.execute(delete(T).where(T.c.id == job_id)).rowcount == 1
    shutil.rmtree(directory / job_id, ignore_errors=True)
    return done


def reap(store, directory: Path, stale_seconds: int) -> None:
    """Fail the jobs whose worker died (stale heartbeat); delete expired jobs and their files."""
    when = now()
    with store.transaction() as tx:
        stale = [r.id for r in tx.conn.execute(
            select(T.c.id).where(T.c.state.in_(ACTIVE), T.c.heartbeat < when - timedelta(seconds=stale_seconds)))]
        expired = [r.id for r in tx.conn.execute(
            select(T.c.id).where(T.c.expires.is_not(None), T.c.expires < when))]
        if expired:
            tx.conn.execute(delete(T).where(T.c.id.in_(expired)))
        if stale:
            tx.conn.execute(update(T).where(T.c.id.in_(stale), or_(T.c.state == "queued", T.c.state == "running"))
                            .values(state="failed", progress="failed", error=orjson.dumps(
                                ["the export was interrupted (the server stopped or restarted before it "
                                 "finished); kick it off again"]).decode(),
                                    expires=when + timedelta(seconds=stale_seconds)))
    for job_id in stale + expired:
        shutil.rmtree(directory / job_id, ignore_errors=True)
