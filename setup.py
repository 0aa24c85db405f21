"""The package list, which pyproject.toml cannot compute: ches_curate's own packages, found, plus the top-level
folders `pipelines/` and `plugins/`, installed under ches_curate by `[tool.setuptools.package-dir]`."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["ches_curate", "ches_curate.*"]), "ches_curate.pipelines",
                "ches_curate.builtin_plugins"])
