"""Bridges: vmwatch's memory under other people's tools (Volatility 3)."""
