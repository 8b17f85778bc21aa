"""`shelfcast demo`: a catalogue, a warehouse feed and some buyers, all through the public HTTP API,
so a newcomer sees the stock overlay move on the stream without setting anything up."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from typing import Any

import aiohttp

log = logging.getLogger("shelfcast.demo")

REGION = "US-West"
WAREHOUSES = {"LAX": ("Los Angeles", ["US-West"]), "NJ": ("New Jersey", ["US-East", "US-West"])}
PRODUCTS = {
    "hoodie-s": ("Cloud Hoodie 云朵连帽衫", "39.00", {"size": "S"}, 40),
    "hoodie-m": ("Cloud Hoodie 云朵连帽衫", "39.00", {"size": "M"}, 120),
    "hoodie-l": ("Cloud Hoodie 云朵连帽衫", "39.00", {"size": "L"}, 25),
    "hoodie-xl": ("Cloud Hoodie 云朵连帽衫", "39.00", {"size": "XL"}, 8),
}
DEMO_SKUS = tuple(PRODUCTS)


class DemoShop:
    def __init__(self, http: aiohttp.ClientSession, base: str, admin_key: str, room_id: str) -> None:
        self._http = http
        self._base = base
        self._admin = {"Authorization": f"Bearer {admin_key}"}
        self._room = room_id
        self._seq = itertools.count(1)

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self._http.request(method, self._base + path, json=body, headers=self._admin) as resp:
            return resp.status, await resp.json(content_type=None)

    async def seed(self) -> None:
        for wh, (name, regions) in WAREHOUSES.items():
            await self._call("PUT", f"/api/warehouses/{wh}", {"name": name, "regions": regions})
        for sku, (name, price, attributes, _) in PRODUCTS.items():
            await self._call(
                "PUT", f"/api/skus/{sku}", {"name": name, "price": price, "currency": "USD", "group": "hoodie", "attributes": attributes}
            )
        for wh in WAREHOUSES:
            levels = [{"sku": sku, "on_hand": units // len(WAREHOUSES)} for sku, (*_, units) in PRODUCTS.items()]
            await self._call("PUT", f"/api/warehouses/{wh}/snapshot", {"as_of": time.time(), "levels": levels})

    async def run(self) -> None:
        """Heartbeats keep the feed fresh; buyers trickle in; sold-out sizes get restocked later."""
        rng = random.Random(7)
        while True:
            for wh in WAREHOUSES:
                await self._call("POST", f"/api/warehouses/{wh}/heartbeat")
            sku = rng.choice(DEMO_SKUS)
            status, body = await self._call(
                "POST",
                f"/api/rooms/{self._room}/orders",
                {"sku": sku, "quantity": rng.choice((1, 1, 2)), "region": REGION, "idempotency_key": f"demo-{time.time_ns()}", "buyer": f"demo-{rng.randrange(1000)}"},
            )
            if status == 201:
                await self._call("POST", f"/api/rooms/{self._room}/orders/{body['order']['id']}/confirm")
            elif status == 409 and rng.random() < 0.3:
                event = {"id": f"restock-{time.time_ns()}", "warehouse": "LAX", "sku": sku, "delta": 30, "seq": next(self._seq)}
                await self._call("POST", "/api/stock/events", {"events": [event]})
            await asyncio.sleep(rng.uniform(1.0, 3.0))


async def run_demo_shop(shop: DemoShop) -> None:
    try:
        await shop.seed()
        await shop.run()
    except asyncio.CancelledError:
        raise
    except Exception:  # the demo's buyers must never take the server down
        log.exception("demo shop stopped")
