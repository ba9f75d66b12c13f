"""Bundled YAML job recipes (package data)."""
