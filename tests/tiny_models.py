"""Moved to `ches_curate.testing.tiny_models` (the plugin author's kit ships it); imported here for tests written
against the old path."""

from ches_curate.testing.tiny_models import ARCHS, CHATML_TEMPLATE, build_tiny_model  # noqa: F401
