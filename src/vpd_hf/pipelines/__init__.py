"""Pipelines that transformers does not ship: `referring-image-segmentation`.

Depth and semantic segmentation use transformers' own `depth-estimation` and `image-segmentation` pipelines.
"""

from .referring_segmentation import ReferringImageSegmentationPipeline, register_referring_pipeline

__all__ = ["ReferringImageSegmentationPipeline", "register_referring_pipeline"]
