"""Shared utilities: data loading and helpers."""
