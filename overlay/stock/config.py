"""Settings of the stock domain (the server's one config holds one of these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StockConfig:
    """Settings of the stock side (ledger, feeds, orders)."""

    stale_after_s: float = 10.0  # a warehouse not heard from for longer shows "syncing"
    reservation_hold_s: float = 600.0  # unconfirmed reservations expire after this
    low_fraction: float = 0.30  # remaining fraction below which a SKU is "low"
    critical_sellout_s: float = 300.0  # predicted sell-out sooner than this is "critical"
    max_batch_events: int = 1000
    max_snapshot_levels: int = 10_000
    max_order_quantity: int = 1000
    critical_fraction: float = 0.10  # remaining fraction below which a SKU is "critical"
    low_sellout_s: float = 900.0  # predicted sell-out sooner than this is "low"
    anomaly_min_drop: int = 3  # a feed drop to zero from at least this many units is an anomaly
    velocity_tau_s: float = 60.0  # smoothing time constant of sales velocity (minute scale)
    alert_cooldown_s: float = 60.0  # the same alert for the same SKU fires at most this often
    alert_hysteresis: float = 0.05  # low-stock alert re-arms only above low_fraction + this
    service_level_z: float = 1.65  # safety-stock z (1.65 ~ 95 % cycle service level)
    default_lead_time_days: float = 7.0
    default_show_surge: float = 1.0  # demand multiplier during a show when no past show is known
    tick_s: float = 1.0  # period of the expiry / staleness / alert timer
    durable_commits: bool = True  # SQLite synchronous=FULL (survives power loss, not just a crash)
    # With Redis: a snapshot of the ledger every this many commands and at least this often while
    # commands come (0 turns a trigger off); the stream is trimmed below the previous snapshot.
    snapshot_every: int = 5000
    snapshot_every_s: float = 300.0
