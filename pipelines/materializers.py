"""A ZenML materializer for `datasets.Dataset`: one Parquet file, read back into memory.

ZenML's own (its Hugging Face integration) requires datasets < 4; this one has no such pin.
The step library's curated output and a user's `datasets.Dataset` artifacts go through it.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import datasets
import pyarrow.parquet as pq
from zenml.enums import ArtifactType
from zenml.materializers.base_materializer import BaseMaterializer

from ches_curate.pipelines.sources import installed_source

FILE_NAME = "data.parquet"


@installed_source
class DatasetMaterializer(BaseMaterializer):
    """A `datasets.Dataset` as `data.parquet` in the artifact store (its rows, in order; no cache files)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (datasets.Dataset,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def load(self, data_type: type[Any]) -> datasets.Dataset:
        with self.artifact_store.open(os.path.join(self.uri, FILE_NAME), "rb") as handle:
            return datasets.Dataset(pq.read_table(handle))

    def save(self, data: datasets.Dataset) -> None:
        with self.artifact_store.open(os.path.join(self.uri, FILE_NAME), "wb") as handle:
            pq.write_table(data.with_format("arrow")[:], handle)

    def extract_metadata(self, data: datasets.Dataset) -> dict[str, Any]:
        return {"n_rows": len(data), "columns": list(data.column_names)}
