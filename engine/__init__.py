"""The coupon grab engine (see README.md and docs/architecture.md)."""
