"""Datasets for vpd_hf: loaders and generators of training / evaluation data.

`synthetic`: an offline procedural indoor-scene dataset (RGB, metric z-depth, semantic and instance labels, referring
expressions) rendered with NumPy, written as parquet in the Hub's NYUv2 / ADE20K / RefCOCO column layouts.
"""

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
    "OBJECT_KINDS",
    "SCENE_TYPES",
    "SYNTHETIC_ID2LABEL",
    "SYNTHETIC_LABEL2ID",
    "SyntheticScene",
    "SyntheticScenes",
    "generate_scene",
    "make_synthetic_dataset",
    "rle_decode",
    "rle_encode",
    "save_synthetic_dataset",
]
