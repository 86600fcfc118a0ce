"""Media in: decode images and videos safely, cut them into Fuyu patches."""
from encoders.image import decode_array, load_image
from encoders.limits import MediaError, MediaLimits
from encoders.patchify import PatchConfig, Patches, normalize_patches, patchify
from encoders.video import CONTAINERS, DecodedVideo, VideoReader, VideoSampling, load_video

__all__ = ["MediaError", "MediaLimits", "load_image", "decode_array", "VideoSampling", "DecodedVideo", "VideoReader",
           "load_video", "CONTAINERS", "PatchConfig", "Patches", "patchify", "normalize_patches"]
