"""Tiny random LLaVA-OneVision models and hand-built inputs for the tests.

Everything is defined once, in ``earlytom_ext.tiny_model`` (shared with the demo and the
benchmarks); this module re-exports it under the names the tests use.
"""

from earlytom_ext.tiny_model import (  # noqa: F401  (re-exported for the tests)
    GRID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PAD_ID,
    PATCH_SIZE,
    POOLED,
    TEXT_ID_RANGE,
    TOKENS_PER_FRAME,
    VIDEO_KINDS,
    VIDEO_TOKEN_ID,
    VOCAB,
    build_model,
    image_token_count,
    make_feature_video,
    make_image,
    make_inputs,
    make_video,
    tiny_config,
    video_token_count,
)
