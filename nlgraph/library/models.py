"""Whole models built from the library's memories: CMS, Hope, baselines."""

from __future__ import annotations
