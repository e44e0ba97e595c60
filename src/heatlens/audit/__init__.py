"""Dataset-scale audits: explain and score a whole dataset, resumably, locally or on Ray.

>>> import heatlens as hl
>>> a = hl.audit("efficientnet-lite0", "photos/", methods=["gradcam"], metrics=["deletion"], out="audit/")
>>> a.scores                       # pandas DataFrame, a row per (image, method)
>>> a.maps("gradcam")              # lazy zarr array (N,h,w) float16
>>> hl.Audit.open("audit/")        # the same records, later

The store (Parquet + Zarr + a JSON manifest) is described in ``heatlens.audit.store``, the engine in
``heatlens.audit.engine``, the data sources in ``heatlens.audit.data``; docs/audit.md has the whole story.
"""

import sys
import types

from .data import Source, as_source
from .engine import DEFAULT_MAP_SIZE, DEFAULT_SHARD_SIZE, ENGINES, audit, map_statistics
from .store import MAP_STATS, Audit

__all__ = ["Audit", "Source", "audit", "as_source", "map_statistics", "MAP_STATS", "ENGINES",
           "DEFAULT_SHARD_SIZE", "DEFAULT_MAP_SIZE"]


class _CallableModule(types.ModuleType):
    """``heatlens.audit(...)`` calls ``audit``: the package and the function share the name ``hl.audit``."""

    def __call__(self, *args, **kwargs):
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
