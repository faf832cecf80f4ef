"""Datasets for vpd_hf: loaders and generators of training / evaluation data.

`synthetic`: an offline procedural indoor-scene dataset (RGB, metric z-depth, surface normals, semantic and instance
labels, referring expressions) rendered with NumPy, written as parquet in the Hub's NYUv2 / ADE20K / RefCOCO column layouts.

Adapters (Hub-layout `datasets.Dataset` -> model inputs, lazily): `depth_dataset`, `segmentation_dataset`,
`referring_dataset`, `normals_dataset`, and `dense_dataset` (any of depth / segmentation / normals labels of one image,
for multi-task models; `normals`: the 8-bit normal-map encoding); batching: `collate_fn`; epochs of the random augmentation: `set_epoch(dataset, epoch)`;
augmentations of the official recipes: `augmentation`; raw releases -> parquet: `converters`.
"""

from .augmentation import (
    AdapterTransform,
    DepthAugmentation,
    InvalidRowError,
    SegmentationAugmentation,
    get_adapter_transform,
    photometric_distortion,
    resize_referring,
    sample_rng,
    set_epoch,
)
from .collate import collate_fn
from .converters import convert_ade20k, convert_nyu, convert_refcoco
from .dense import DENSE_TASKS, DenseAugmentation, dense_dataset, normals_dataset
from .depth import DepthTransform, depth_dataset, nyu_scene_id
from .normals import decode_normals, encode_normals
from .referring import ReferringTransform, decode_mask, polygons_to_mask, referring_dataset
from .segmentation import SegmentationTransform, ade20k_id2label, segmentation_dataset
from .synthetic import (
    OBJECT_KINDS,
    SCENE_TYPES,
    SYNTHETIC_ID2LABEL,
    SYNTHETIC_LABEL2ID,
    SyntheticScene,
    SyntheticScenes,
    generate_scene,
    make_synthetic_dataset,
    rle_decode,
    rle_encode,
    save_synthetic_dataset,
)

__all__ = [
    "DENSE_TASKS",
    "OBJECT_KINDS",
    "SCENE_TYPES",
    "SYNTHETIC_ID2LABEL",
    "SYNTHETIC_LABEL2ID",
    "AdapterTransform",
    "DenseAugmentation",
    "DepthAugmentation",
    "DepthTransform",
    "InvalidRowError",
    "ReferringTransform",
    "SegmentationAugmentation",
    "SegmentationTransform",
    "SyntheticScene",
    "SyntheticScenes",
    "ade20k_id2label",
    "collate_fn",
    "convert_ade20k",
    "convert_nyu",
    "convert_refcoco",
    "decode_mask",
    "decode_normals",
    "dense_dataset",
    "depth_dataset",
    "encode_normals",
    "generate_scene",
    "get_adapter_transform",
    "make_synthetic_dataset",
    "normals_dataset",
    "nyu_scene_id",
    "photometric_distortion",
    "polygons_to_mask",
    "referring_dataset",
    "resize_referring",
    "rle_decode",
    "rle_encode",
    "sample_rng",
    "save_synthetic_dataset",
    "segmentation_dataset",
    "set_epoch",
]
