"""The LMDB concept store: records, sparse index codecs, overlap bookkeeping and jobs."""
from .records import (ConceptMeta, ConceptRecord, JobRecord, Overlap, SparseDelta,
                      validate_name)
from .store import ConceptStore

__all__ = ["ConceptMeta", "ConceptRecord", "ConceptStore", "JobRecord", "Overlap", "SparseDelta",
           "validate_name"]
