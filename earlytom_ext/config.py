"""EarlyTom configuration: the algorithm's parameters, validated, plus the paper's presets."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Tuple

__all__ = ["EarlyTomConfig", "PAPER_PRESETS", "preset"]


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class EarlyTomConfig:
    """Parameters of EarlyTom (see docs/algorithm.md).

    Attributes:
        retain_ratio: fraction r of the uncompressed ``T x 196`` video tokens kept, in (0, 1].
        tau: segmentation threshold on the EMA frame similarity, in [-1, 1]. ``tau=-1`` never
            cuts on similarity (segments are then only cut by ``max_window``).
        max_window: a segment is cut when it would reach ``max_window`` frames, so a segment
            holds at most ``max_window - 1`` frames. Integer >= 2.
        ema: EMA factor alpha of the running similarity, in [0, 1].
        prune_layers: 0-based encoder layers after which Stage I (frame merging) runs; strictly
            increasing, non-negative, and below the encoder depth. The last one also supplies
            the attention scores used by Stage II.
        keep_last_interior: ``False`` (default) reproduces the published code, which never
            emits the last interior frame of a segment; ``True`` emits it and uses the plain
            average when the last interior pair is merged.
    """

    retain_ratio: float = 0.1
    tau: float = 0.6
    max_window: int = 8
    ema: float = 0.9
    prune_layers: Tuple[int, ...] = (6, 21, 23)
    keep_last_interior: bool = False

    def __post_init__(self):
        # Accept any sequence of ints for prune_layers; store a tuple (hashable, immutable).
        layers = self.prune_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(
                f"EarlyTomConfig.prune_layers must be a sequence of ints, got {type(layers).__name__}"
            )
        object.__setattr__(self, "prune_layers", tuple(layers))
        self.validate()

    def validate(self, num_layers: Optional[int] = None) -> "EarlyTomConfig":
        """Check every field; with ``num_layers`` (encoder depth) also check the prune layers.

        Raises ``TypeError`` for a wrong type and ``ValueError`` for a value out of range, with
        the field name and the allowed range in the message. Returns ``self``.
        """
        r = self.retain_ratio
        if not _is_real(r):
            raise TypeError(f"EarlyTomConfig.retain_ratio must be a float in (0, 1], got {r!r}")
        if not (math.isfinite(r) and 0.0 < r <= 1.0):
            raise ValueError(f"EarlyTomConfig.retain_ratio must be in (0, 1], got {r!r}")
        if not _is_real(self.tau):
            raise TypeError(f"EarlyTomConfig.tau must be a float in [-1, 1], got {self.tau!r}")
        if not (math.isfinite(self.tau) and -1.0 <= self.tau <= 1.0):
            raise ValueError(f"EarlyTomConfig.tau must be in [-1, 1], got {self.tau!r}")
        if not isinstance(self.max_window, int) or isinstance(self.max_window, bool):
            raise TypeError(f"EarlyTomConfig.max_window must be an int >= 2, got {self.max_window!r}")
        if self.max_window < 2:
            raise ValueError(f"EarlyTomConfig.max_window must be >= 2, got {self.max_window}")
        if not _is_real(self.ema):
            raise TypeError(f"EarlyTomConfig.ema must be a float in [0, 1], got {self.ema!r}")
        if not (math.isfinite(self.ema) and 0.0 <= self.ema <= 1.0):
            raise ValueError(f"EarlyTomConfig.ema must be in [0, 1], got {self.ema!r}")
        if not isinstance(self.keep_last_interior, bool):
            raise TypeError(
                f"EarlyTomConfig.keep_last_interior must be a bool, got {self.keep_last_interior!r}"
            )
        layers = self.prune_layers
        if len(layers) == 0:
            raise ValueError("EarlyTomConfig.prune_layers must name at least one encoder layer")
        for p in layers:
            if not isinstance(p, int) or isinstance(p, bool):
                raise TypeError(f"EarlyTomConfig.prune_layers must hold ints, got {p!r} in {layers}")
            if p < 0:
                raise ValueError(f"EarlyTomConfig.prune_layers must be non-negative, got {layers}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"EarlyTomConfig.prune_layers must be strictly increasing, got {layers}")
        if num_layers is not None and layers[-1] >= num_layers:
            raise ValueError(
                f"EarlyTomConfig.prune_layers must be < the encoder depth {num_layers} "
                f"(layers 0..{num_layers - 1}), got {layers}"
            )
        return self

    def replace(self, **changes) -> "EarlyTomConfig":
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _paper(tau: float, layers: Tuple[int, int, int], r: float) -> EarlyTomConfig:
    return EarlyTomConfig(retain_ratio=r, tau=tau, max_window=6, ema=0.9, prune_layers=layers)


# The paper's per-benchmark settings for LLaVA-OneVision-7B (max_window 6, ema 0.9).
PAPER_PRESETS = {
    "mvbench": {
        0.10: _paper(0.65, (8, 14, 20), 0.10),
        0.15: _paper(0.8, (6, 14, 20), 0.15),
        0.20: _paper(0.8, (6, 14, 20), 0.20),
        0.25: _paper(0.8, (6, 14, 20), 0.25),
    },
    "videomme": {
        0.10: _paper(0.3, (10, 21, 23), 0.10),
        0.15: _paper(0.4, (8, 21, 23), 0.15),
        0.20: _paper(0.5, (8, 21, 23), 0.20),
        0.25: _paper(0.7, (10, 21, 23), 0.25),
    },
    "longvideobench": {
        0.10: _paper(0.3, (10, 21, 23), 0.10),
        0.15: _paper(0.5, (10, 21, 23), 0.15),
        0.20: _paper(0.6, (10, 21, 23), 0.20),
        0.25: _paper(0.8, (4, 14, 24), 0.25),
    },
    "egoschema": {
        0.10: _paper(0.3, (10, 21, 23), 0.10),
        0.15: _paper(0.5, (10, 21, 23), 0.15),
        0.20: _paper(0.6, (10, 21, 23), 0.20),
        0.25: _paper(0.7, (10, 21, 23), 0.25),
    },
}


def preset(benchmark: str = "videomme", retain_ratio: float = 0.1) -> EarlyTomConfig:
    """The paper's setting for ``benchmark`` at ``retain_ratio`` (LLaVA-OneVision-7B).

    ``benchmark`` is one of ``mvbench``, ``videomme``, ``longvideobench``, ``egoschema``;
    ``retain_ratio`` one of 0.10, 0.15, 0.20, 0.25.
    """
    key = benchmark.lower().replace("-", "").replace("_", "")
    if key not in PAPER_PRESETS:
        raise ValueError(f"benchmark must be one of {sorted(PAPER_PRESETS)}, got {benchmark!r}")
    table = PAPER_PRESETS[key]
    for r, cfg in table.items():
        if abs(r - retain_ratio) < 1e-9:
            return cfg
    raise ValueError(f"retain_ratio for preset must be one of {sorted(table)}, got {retain_ratio!r}")
