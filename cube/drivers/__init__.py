"""Isolation drivers: one interface (``base.Driver``), one module per platform mechanism."""
