"""Bexar's nova virt driver: nova-compute runs instances as Bexar microVMs (docs/nova.md)."""
