"""``mrs convert``: load a model entry once and write it, ready to serve, as an mrs conversion.

See ``mrs.loading.conversion`` for the format; a ``Plain`` entry whose ``model_id`` is
the output directory serves it.
"""

from __future__ import annotations

from pathlib import Path

from mrs.config.schema import ModelEntry
from mrs.loading.conversion import check_out_dir, save_conversion
from mrs.loading.load import load_checkpoint


def convert(entry: ModelEntry, out: str | Path) -> Path:
    """Load ``entry`` as serving would (casting, in-situ quantizing) and write it to ``out``."""
    root = check_out_dir(out)  # before the slow part
    return save_conversion(load_checkpoint(entry), root)
