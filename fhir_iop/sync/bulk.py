"""Bulk pull: FHIR Bulk Data ``$export`` from an EHR, streamed into the store, resumable.

    from fhir_iop.sync.bulk import bulk_pull
    result = bulk_pull(store, connection)        # types: connection.bulk["types"] or its pull types

1. Kick-off ``GET [base]/$export?_type=…&_since=<cursor>`` with ``Prefer: respond-async`` (the
   level may be ``Patient`` or ``Group/<id>``: ``bulk: {level: …}``); the status URL is committed in
   ``sync_state`` (resource_type ``"*"``) before anything else, so a killed run polls the same job.
2. Poll the status URL, sleeping what ``Retry-After`` says (``X-Progress`` logged), until the
   manifest comes; its ``transactionTime`` is committed with the job.
3. Download each output file as a stream, line by line (``requests`` ``stream=True``): memory
   holds one batch (``bulk: {batch: 500}``) whatever the file's size. Each batch is stored in ONE
   store transaction (origin ``sync:<name>``, ids and references localized as in
   :mod:`fhir_iop.sync.pull`) together with the number of lines of that file done
   (``bulk_files_done``, JSON ``{url: lines}``). A killed run starts again at the first line not
   committed; storing is idempotent, so a batch replayed after a crash between the write and the
   commit changes nothing.
4. When every file is in, the job is cleared and the cursor set to the manifest's
   ``transactionTime`` (the next export's ``_since``) in one transaction; the job is deleted at
   the EHR (``DELETE`` on the status URL, a courtesy).

A job the EHR forgot (404/410 on the status URL or a file) is started again with the same
``_since``. Manifest ``error`` files (OperationOutcomes) are counted and their text reported.
"""

from __future__ import annotations

import logging

import orjson

from fhir_iop.store.repository import Store
from fhir_iop.sync.client import EhrClient, EhrError
from fhir_iop.sync.config import Connection
from fhir_iop.sync.pull import PullResult, read_state, store_batch, write_state

log = logging.getLogger(__name__)

JOB = "*"  # sync_state.resource_type of a bulk job


def _start(store: Store, client: EhrClient, types: tuple[str, ...], since: str | None, level: str) -> str:
    url = client.export_kickoff(types=types, since=since, level=level)
    with store.transaction() as tx:
        write_state(tx, client.connection.name, JOB, bulk_status_url=url, bulk_state="polling",
                    bulk_transaction_time=None, bulk_files_done=None)
    log.info("sync %s: bulk export started", client.connection.name)
    return url


def bulk_pull(store: Store, connection: Connection, types=None, client: EhrClient | None = None,
              max_wait: float = 3600.0, batch: int | None = None, stop_after_batches: int | None = None) -> PullResult:
    """Run (or resume) one bulk export into the store. ``stop_after_batches``: return after that many
    committed batches (tests of resuming)."""
    types = tuple(types or connection.bulk.get("types") or connection.pull_types)
    level = connection.bulk.get("level", "")
    batch = int(batch or connection.bulk.get("batch", 500))
    result = PullResult()
    own = client is None
    client = client or EhrClient(connection)
    try:
        with store.reading() as tx:
            row = read_state(tx, connection.name, JOB)
        since = (row.cursor if row is not None and row.cursor else None) or connection.since
        url = row.bulk_status_url if row is not None else None
        if not url:
            url = _start(store, client, types, since, level)
        while True:
            try:
                manifest = client.export_wait(url, max_wait=max_wait)
                break
            except EhrError as e:
                if e.status in (404, 410):
                    log.warning("sync %s: the EHR forgot the bulk export; starting it again", connection.name)
                    url = _start(store, client, types, since, level)
                    continue
                raise
        with store.reading() as tx:
            row = read_state(tx, connection.name, JOB)
        done = orjson.loads(row.bulk_files_done) if row is not None and row.bulk_files_done else {}
        if row is None or row.bulk_state != "downloading":
            with store.transaction() as tx:
                write_state(tx, connection.name, JOB, bulk_state="downloading",
                            bulk_transaction_time=manifest.get("transactionTime"),
                            bulk_files_done=orjson.dumps(done).decode())
        requires_token = bool(manifest.get("requiresAccessToken", True))
        batches = 0
        for item in manifest.get("output") or ():
            ftype, furl = item.get("type"), item.get("url")
            if not furl or (types and ftype not in types):
                continue
            skip = int(done.get(furl, 0))
            if skip < 0:  # finished
                continue
            pending: list[dict] = []
            line_no = skip

            def flush() -> None:
                nonlocal pending
                with store.transaction(origin=connection.origin) as tx:
                    store_batch(tx, connection, pending, result, types)
                    done[furl] = line_no
                    write_state(tx, connection.name, JOB, bulk_files_done=orjson.dumps(done).decode())
                pending = []
                result.pages += 1

            for line_no, line in client.download_lines(furl, requires_token, skip):
                try:
                    pending.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    result.add(str(ftype), "invalid")
                    result.errors.setdefault(str(ftype), f"bulk file line {line_no} is not JSON")
                if len(pending) >= batch:
                    flush()
                    batches += 1
                    if stop_after_batches is not None and batches >= stop_after_batches:
                        return result
            done[furl] = line_no
            flush()
            done[furl] = -1  # the whole file is in
            with store.transaction() as tx:
                write_state(tx, connection.name, JOB, bulk_files_done=orjson.dumps(done).decode())
            log.info("sync %s: bulk file of %s done (%d lines)", connection.name, ftype, line_no)
        for item in manifest.get("error") or ():
            result.add("OperationOutcome", "error")
            try:
                from fhir_iop.sync.client import outcome_text
                texts = [outcome_text(oo) for oo in client.download(item["url"], requires_token)]
                result.errors.setdefault("$export", "; ".join(t for t in texts if t)[:2000])
            except EhrError as e:
                result.errors.setdefault("$export", e.message)
        with store.transaction() as tx:
            write_state(tx, connection.name, JOB, cursor=manifest.get("transactionTime") or since,
                        bulk_status_url=None, bulk_state=None, bulk_transaction_time=None, bulk_files_done=None)
        try:
            client.delete_url(url)
        except EhrError:
            pass  # the EHR cleans up on its own schedule
        return result
    finally:
        if own:
            client.close()
