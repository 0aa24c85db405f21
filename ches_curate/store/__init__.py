"""The DuckDB store: the system of record for datasets, scores, selections and results.

`Store` is the public surface; every write goes through its methods (or its
`transaction()`), each one short-lived transaction. The modules behind it:

- `database`: the `Store` class itself;
- `connections`: short-lived connections, the lock wait, the read-only SQL sandbox;
- `migrations`: the numbered schema migrations;
- `records`: row types and the Arrow/Parquet shapes written in batches;
- `integrity`: refusing a damaged or foreign DuckDB file before writing into it.
"""

from __future__ import annotations

from ches_curate.errors import StoreLockedError
from ches_curate.store.database import DEFAULT_DB, Store, default_path
from ches_curate.store.integrity import DamagedStoreError
from ches_curate.store.records import DatasetVersion

__all__ = ["DEFAULT_DB", "DamagedStoreError", "DatasetVersion", "Store", "StoreLockedError", "default_path"]
