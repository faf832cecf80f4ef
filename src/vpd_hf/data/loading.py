"""Opening a dataset given as a Hub id or a local folder (parquet in the Hub layouts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_splits(dataset: str | Path, config_name: str | None = None) -> Any:
    """The `datasets.DatasetDict` of `dataset`: a Hub id (with its configuration `config_name`), or a local folder:
    its sub-folder `config_name` when there is one (the synthetic data's `scenes` / `referring`), else its parquet
    files (the converters' `data/{split}-*.parquet`)."""
    import datasets

    path = Path(str(dataset))
    if path.is_dir():
        # Local folders go through the parquet builder: `load_dataset(folder, config)` caches by the folder's *name*
        # (datasets 5.2), so two folders called `data` would share one cache and the second would load the first.
        if config_name and (path / config_name).is_dir():
            path = path / config_name
        return datasets.load_dataset("parquet", data_dir=str(path))
    return datasets.load_dataset(str(dataset), config_name)


__all__ = ["load_splits"]
