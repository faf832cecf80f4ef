"""VPD's pipelines: `referring-image-segmentation` (which transformers does not ship), and transformers'
`depth-estimation` and `image-segmentation` pipelines extended to batch VPD images of different sizes."""

from .referring_segmentation import ReferringImageSegmentationPipeline, register_referring_pipeline
from .vision import VPDDepthEstimationPipeline, VPDImageSegmentationPipeline, register_vision_pipelines


def register_pipelines() -> None:
    """Registers the three VPD pipelines with transformers' pipeline registry (done by `import vpd_hf`)."""
    register_referring_pipeline()
    register_vision_pipelines()


__all__ = [
    "ReferringImageSegmentationPipeline",
    "VPDDepthEstimationPipeline",
    "VPDImageSegmentationPipeline",
    "register_pipelines",
    "register_referring_pipeline",
    "register_vision_pipelines",
]
