"""Metrics and logging; a leaf package any module may import."""
