"""Shared server bootstrap, flags, errors, metrics, model loading and client helpers."""
