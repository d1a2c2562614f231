"""Helpers for vmwatch's own tests and for users testing their rules."""
