"""Health checks for orchestrators and load balancers.

- ``GET /livez``: the process is up and its event loop answers (the answer itself proves it). Always
  200 while serving: restarting a process because Redis is down would only drop its viewers.
- ``GET /readyz``: whether to send new people here. 503 with the reasons when a dependency is lost
  (the cluster's Redis, the stock store or shared stock log) or the server is shutting down; people
  already watching keep watching either way.
- ``GET /healthz``: the older name, the same readiness with its earlier body (``"ok"`` /
  ``"degraded"``), kept for existing checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .keys import PLACEMENT, STOCK


@dataclass
class Lifecycle:
    shutting_down: bool = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)  # mutable: an application's own keys are frozen once it runs


def problems(app: web.Application) -> dict[str, str]:
    """Dependency -> what is wrong with it; empty: ready."""
    found: dict[str, str] = {}
    if app[LIFECYCLE].shutting_down:
        found["server"] = "shutting down"
    placement = app.get(PLACEMENT)
    if placement is not None and not placement.cluster.healthy:
        found["redis"] = "unreachable: this node's heartbeat has not reached the cluster's Redis lately"
    stock = app.get(STOCK)
    if stock is None:
        found["stock"] = "stock service not started"
    elif (problem := stock.log.problem) is not None:
        found["stock"] = problem
    return found


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"}, headers={"Cache-Control": "no-store"})


async def readyz(request: web.Request) -> web.Response:
    found = problems(request.app)
    if found:
        reason = "; ".join(f"{name}: {problem}" for name, problem in found.items())
        return web.json_response({"status": "not_ready", "reason": reason, "problems": found}, status=503,
                                 headers={"Cache-Control": "no-store"})
    return web.json_response({"status": "ready"}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    found = problems(request.app)
    if found:
        body: dict[str, object] = {"status": "degraded", "problems": found}
        if "redis" in found:
            body["cluster"] = "redis unreachable"  # what this endpoint said before /readyz existed
        return web.json_response(body, status=503)
    return web.json_response({"status": "ok"})


def mark_shutting_down(app: web.Application) -> None:
    """From SIGTERM on: a load balancer polling on a kept-alive connection stops sending people here."""
    app[LIFECYCLE].shutting_down = True


def setup_health(app: web.Application) -> None:
    async def shutting_down(app: web.Application) -> None:
        mark_shutting_down(app)

    app[LIFECYCLE] = Lifecycle()
    app.on_shutdown.append(shutting_down)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
