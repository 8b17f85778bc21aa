"""The stock domain: warehouses, SKUs, the ledger that never oversells, feeds, orders, forecasts,
alerts, replenishment, and how it is stored (SQLite) or shared (a Redis Stream command log)."""
