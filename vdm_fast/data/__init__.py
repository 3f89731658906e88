"""Training data: built-in bouncing shapes (data.bouncing), folders of videos or images (data.video_folder), the
sources by name (data.sources) and the deterministic example stream (data.stream). This module only re-exports."""

from vdm_fast.data.bouncing import BouncingShapes
from vdm_fast.data.sources import make_dataset, make_image_source
from vdm_fast.data.stream import GlobalBatchSampler, TrainingItems, item_seed, loader_throughput
from vdm_fast.data.video_folder import BadDataError, ImageFolder, VideoFolder

__all__ = ["BadDataError", "BouncingShapes", "VideoFolder", "ImageFolder", "TrainingItems", "GlobalBatchSampler",
           "make_dataset", "make_image_source", "item_seed", "loader_throughput"]
