"""The service's own small state: settings stored once for every node, admin keys."""

from __future__ import annotations

from errands.store.shared import Dialect, Tx


class MetaOps(Dialect):
    async def meta_setdefault(self, key: str, value: str) -> str:
        async def op(tx: Tx) -> str:
            row = await tx.fetchrow(self.sql.meta_setdefault, key, value)
            assert row is not None, "the statement always answers the stored value"
            return str(row[0])

        return await self._write(op, mode="alone")

    async def hold(self, name: str, until: float) -> float:
        async def op(tx: Tx) -> float:
            row = await tx.fetchrow(self.sql.hold, f"hold:{name}", repr(until))
            assert row is not None, "the statement always answers the stored value"
            return float(row[0])

        return await self._write(op, mode="alone")

    async def holds(self) -> dict[str, float]:
        return {r[0].removeprefix("hold:"): float(r[1]) for r in await self._fetch(self.sql.holds)}

    async def add_admin_key(self, key_hash: str) -> None:
        now = self.clock.now()

        async def op(tx: Tx) -> None:
            await tx.execute(self.sql.add_admin_key, key_hash, now)

        await self._write(op, mode="alone")

    async def admin_key_hashes(self) -> set[str]:
        return {r[0] for r in await self._fetch(self.sql.admin_keys)}
