"""The demo's models: the small random LLaVA-OneVision, or a real checkpoint of any family
``earlytom_ext.apply`` supports, with its processor."""

from __future__ import annotations

import os

import torch

from .._logging import logger
from ..tiny_model import build_model
from .families import adapter_class, supported_families
from .report import _one_line


def build_demo_model(vision_layers: int = 26, seed: int = 0, device="cpu", dtype=torch.float32):
    """A small random ``LlavaOnevisionForConditionalGeneration`` (SigLIP geometry and depth of LLaVA-OV)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError("the demo needs transformers: pip install 'earlytom_ext[demo]'") from e
    return build_model(seed=seed, device=device, dtype=dtype, vision_layers=vision_layers)


def load_pretrained(model_id: str, device: torch.device):
    """``(model, processor)`` of a checkpoint of a family ``earlytom_ext.apply`` supports (a local
    folder or a Hugging Face id): LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA, Qwen2.5-VL, Qwen2-VL.

    The family comes from the config (``model_type``), read before any weights load; the class is
    the family's ``...ForConditionalGeneration``. bf16 on CUDA, fp32 on the CPU. Raises ValueError
    (``--model: ...``, one line) when it cannot be loaded.
    """
    try:
        import transformers
        from transformers import AutoConfig, AutoProcessor
    except ImportError as e:
        raise ValueError("--model needs transformers: pip install 'transformers>=4.57'") from e
    model_id = os.path.expanduser(model_id)  # Hugging Face does not expand ~
    if model_id.startswith(("/", ".")) and not os.path.isdir(model_id):
        raise ValueError(f"--model: no such folder: {model_id}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logger.info("loading %s (%s on %s)", model_id, dtype, device)
    try:
        # The config first: another family's weights would load into a full-size random model.
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model: cannot load {model_id!r}: {_one_line(e)}") from e
    from ..integration.adapters import ADAPTERS

    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"--model: {model_id!r} is a {model_type!r} checkpoint; the demo runs {supported_families()} "
            f"checkpoints (model_type {', '.join(repr(t) for t in ADAPTERS)})"
        )
    adapter = adapter_class(model_type)
    # By name: Video-LLaVA has no AutoModelForImageTextToText mapping on 4.57.
    model_class = getattr(transformers, adapter.model_class, None)
    if model_class is None:
        raise ValueError(
            f"--model: this transformers ({transformers.__version__}) has no {adapter.model_class} "
            "(pip install 'transformers>=4.57')"
        )
    try:
        # `dtype` is the argument's name from transformers 4.56 on (4.57.x and 5.x).
        model = model_class.from_pretrained(model_id, config=config, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model_id)
    except ImportError as e:
        raise ValueError(
            f"--model: {_one_line(e)} (the {adapter.family} video processor needs torchvision: pip install torchvision)"
        ) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model: cannot load {model_id!r}: {_one_line(e)}") from e
    return model.to(device).eval(), processor
