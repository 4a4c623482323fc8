"""The demo's models: the small random LLaVA-OneVision, or a real checkpoint with its processor."""

from __future__ import annotations

import os

import torch

from .._logging import logger
from ..tiny_model import build_model
from .report import _one_line


def build_demo_model(vision_layers: int = 26, seed: int = 0, device="cpu", dtype=torch.float32):
    """A small random ``LlavaOnevisionForConditionalGeneration`` (SigLIP geometry and depth of LLaVA-OV)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError("the demo needs transformers: pip install 'earlytom_ext[demo]'") from e
    return build_model(seed=seed, device=device, dtype=dtype, vision_layers=vision_layers)


def load_pretrained(model_id: str, device: torch.device):
    """``(model, processor)`` of a LLaVA-OneVision checkpoint (a local folder or a Hugging Face id).

    bf16 on CUDA, fp32 on the CPU. Raises ValueError (``--model: ...``, one line) when it cannot be
    loaded.
    """
    try:
        from transformers import AutoConfig, AutoProcessor, LlavaOnevisionForConditionalGeneration
    except ImportError as e:
        raise ValueError("--model needs transformers: pip install 'transformers>=4.57'") from e
    model_id = os.path.expanduser(model_id)  # Hugging Face does not expand ~
    if model_id.startswith(("/", ".")) and not os.path.isdir(model_id):
        raise ValueError(f"--model: no such folder: {model_id}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logger.info("loading %s (%s on %s)", model_id, dtype, device)
    try:
        # The config first: another family's weights would load into a full-size random LLaVA-OV.
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model: cannot load {model_id!r}: {_one_line(e)}") from e
    if config.model_type != "llava_onevision":
        raise ValueError(
            f"--model: {model_id!r} is a {config.model_type!r} checkpoint; the demo runs LLaVA-OneVision "
            "checkpoints (earlytom_ext.apply also takes LLaVA-NeXT-Video, Video-LLaVA, Qwen2.5-VL and Qwen2-VL "
            "models in Python: examples/llava_next_video.py and examples/qwen2_5_vl.py in the repository)"
        )
    try:
        # `dtype` is the argument's name from transformers 4.56 on (4.57.x and 5.x).
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_id, config=config, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model_id)
    except ImportError as e:
        raise ValueError(
            f"--model: {_one_line(e)} (the LLaVA-OneVision video processor needs torchvision: pip install torchvision)"
        ) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model: cannot load {model_id!r}: {_one_line(e)}") from e
    return model.to(device).eval(), processor
