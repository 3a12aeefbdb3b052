"""Pipelines, one file each, read top to bottom (installed as rayalign.pipelines)."""
