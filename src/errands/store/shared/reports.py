"""Provider reports (webhooks, capability URLs) and the receipts of every one of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from errands.model import TaskRecord
from errands.store.base import Judge
from errands.store.records import Receipt, ReportOutcome
from errands.store.shared import Dialect, Tx


class ReportOps(Dialect):
    async def apply_report(
        self, receipt: Receipt, judge: Judge, *, job: tuple[Sequence[str], str] | None = None
    ) -> tuple[ReportOutcome, TaskRecord | None]:
        async def op(tx: Tx) -> tuple[ReportOutcome, TaskRecord | None]:
            fresh, record = await tx.report_target(receipt, job)
            if record is None:
                unknown = dataclasses.replace(receipt, outcome=ReportOutcome.UNKNOWN_TASK, status_code=404)
                await tx.add_receipt(unknown)
                return ReportOutcome.UNKNOWN_TASK, None
            about = dataclasses.replace(receipt, task_id=record.id)
            if not fresh:
                await tx.add_receipt(dataclasses.replace(about, outcome=ReportOutcome.DUPLICATE))
                return ReportOutcome.DUPLICATE, None
            outcome, change = judge(record)
            written = await tx.write_changes(change, record)
            await tx.add_receipt(dataclasses.replace(about, outcome=outcome))
            return outcome, None if outcome is ReportOutcome.LATE else written

        return await self._write(op)

    async def record_receipt(self, receipt: Receipt) -> None:
        async def op(tx: Tx) -> None:
            await tx.add_receipt(receipt)

        await self._write(op, mode="alone")

    async def receipts(self, *, task_id: str | None, limit: int) -> list[Receipt]:
        if task_id is None:
            rows = await self._fetch(self.sql.receipts, limit)
        else:
            rows = await self._fetch(self.sql.task_receipts, task_id, limit)
        return [Receipt(*r) for r in rows]
