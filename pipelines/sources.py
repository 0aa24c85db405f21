"""ZenML sources for what this package defines: recorded by import name, under `ches_curate`.

ZenML records where each step, pipeline and materializer comes from (its *source*) and imports
it again from there to run it. For a file below the source root (the folder holding `.zen`) it
records the file's path as the module: in a checkout, `pipelines/steps.py` would become
`pipelines.steps`, the name a user's own `pipelines` package shadows, because the top-level
`pipelines/` folder installs as `ches_curate.pipelines` (docs/reference/layout.md). `installed_source`
records the import name instead, as a source of the `ches-curate` distribution: what ZenML
records from an installed wheel anyway, so a checkout and a wheel record the same sources.
"""

from __future__ import annotations

from importlib import metadata
from typing import TypeVar

from zenml.config.source import DistributionPackageSource, SourceType
from zenml.utils.source_utils import ZENML_SOURCE_ATTRIBUTE_NAME

DISTRIBUTION = "ches-curate"
T = TypeVar("T")


def installed_source(obj: T) -> T:
    """Record a step or pipeline (apply this decorator outermost) or a materializer class as
    `<its module>:<its name>` of the `ches-curate` distribution."""
    target = getattr(obj, "entrypoint", obj)
    setattr(target, ZENML_SOURCE_ATTRIBUTE_NAME, package_source(target.__module__, target.__name__))
    return obj


def package_source(module: str, attribute: str) -> DistributionPackageSource:
    """The ZenML source of `module:attribute` in the `ches-curate` distribution."""
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        version = None
    return DistributionPackageSource(module=module, attribute=attribute, package_name=DISTRIBUTION, version=version,
                                     type=SourceType.DISTRIBUTION_PACKAGE)  # set: ZenML serializes set fields only
