"""The dashboard (``flywheel dashboard``): a web page per agent built from ClickHouse: lifecycle stage,
traffic split, agreement against the threshold, cost saved, latency by route and recent lifecycle events."""
