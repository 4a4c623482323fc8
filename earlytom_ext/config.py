"""EarlyTom configuration: the algorithm's parameters, validated, plus the paper's presets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

__all__ = ["EarlyTomConfig", "PAPER_PRESETS", "PAPER_LLM_MERGE", "preset", "check_llm_merge"]


def finite_number(x) -> bool:
    """``math.isfinite`` that is ``False`` (not an ``OverflowError``) for an int beyond the float range."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_llm_merge(
    layer: int | None,
    ratio: float,
    llm_num_layers: int | None = None,
    names: tuple[str, str] = ("EarlyTomConfig.llm_merge_layer", "EarlyTomConfig.llm_merge_ratio"),
) -> None:
    """Check the inner-LLM merge parameters: ``layer`` (k, ``None`` = off) and ``ratio`` (r_in).

    ``k`` is the 0-based decoder layer before which the merge runs; it needs layer ``k - 1`` for
    the scores, so ``k >= 1``, and with ``llm_num_layers`` (the language model's depth) also
    ``k <= depth - 1``. ``r_in`` is the fraction of the video span removed, in [0, 1).
    ``names`` are the two argument names the messages use. Raises ``TypeError`` / ``ValueError``.
    """
    lname, rname = names
    if not _is_real(ratio):
        raise TypeError(f"{rname} must be a float in [0, 1) (the fraction of the video span removed), got {ratio!r}")
    if not (finite_number(ratio) and 0.0 <= ratio < 1.0):
        raise ValueError(f"{rname} must be in [0, 1) (the fraction of the video span removed), got {ratio!r}")
    if llm_num_layers is not None and (not _is_int(llm_num_layers) or llm_num_layers < 1):
        raise ValueError(f"llm_num_layers must be a positive int (the language model's depth), got {llm_num_layers!r}")
    if layer is None:
        return
    if not _is_int(layer):
        raise TypeError(f"{lname} must be None or an int >= 1 (a 0-based decoder layer index), got {layer!r}")
    if llm_num_layers is None:
        if layer < 1:
            raise ValueError(
                f"{lname} must be >= 1 (the merge runs before decoder layer k and scores with layer k - 1), got {layer}"
            )
    elif not 1 <= layer <= llm_num_layers - 1:
        raise ValueError(
            f"{lname} must be in [1, {llm_num_layers - 1}] for a language model of {llm_num_layers} decoder layers "
            f"(the merge runs before layer k and scores with layer k - 1), got {layer}"
        )


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
            the attention scores used by Stage II. ``None`` (default): the model family's own
            layers, chosen by :func:`~earlytom_ext.apply` for the model it patches ((6, 21, 23)
            on LLaVA-OneVision's SigLIP; ``handle.config`` holds the layers in use).
        keep_last_interior: ``False`` (default) reproduces the published code, which never
            emits the last interior frame of a segment; ``True`` emits it and uses the plain
            average when the last interior pair is merged.
        llm_merge_layer: k of the optional inner-LLM token merge (the published ``INNER_k``):
            before decoder layer k (0-based), the video span is shortened by merging its least
            attended tokens into their most similar kept tokens (scores from layer k - 1, so
            k >= 1; checked against the language model's depth, k <= depth - 1, when applied).
            ``None`` (default) turns it off.
        llm_merge_ratio: r_in, the fraction of the video span removed by that merge (the
            published ``INNER_r``), in [0, 1). Ignored while ``llm_merge_layer`` is ``None``.
    """

    retain_ratio: float = 0.1
    tau: float = 0.6
    max_window: int = 8
    ema: float = 0.9
    prune_layers: tuple[int, ...] | None = None
    keep_last_interior: bool = False
    llm_merge_layer: int | None = None
    llm_merge_ratio: float = 0.5

    def __post_init__(self):
        # Accept any sequence of ints for prune_layers; store a tuple (hashable, immutable).
        layers = self.prune_layers
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise TypeError(
                    f"EarlyTomConfig.prune_layers must be None or a sequence of ints, got {type(layers).__name__}"
                )
            object.__setattr__(self, "prune_layers", tuple(layers))
        self.validate()

    def validate(self, num_layers: int | None = None, llm_num_layers: int | None = None) -> EarlyTomConfig:
        """Check every field; with ``num_layers`` (encoder depth) also check the prune layers, with
        ``llm_num_layers`` (the language model's decoder depth) also ``llm_merge_layer``.

        Raises ``TypeError`` for a wrong type and ``ValueError`` for a value out of range, with
        the field name and the allowed range in the message. Returns ``self``.
        """
        r = self.retain_ratio
        if not _is_real(r):
            raise TypeError(f"EarlyTomConfig.retain_ratio must be a float in (0, 1], got {r!r}")
        if not (finite_number(r) and 0.0 < r <= 1.0):
            raise ValueError(f"EarlyTomConfig.retain_ratio must be in (0, 1], got {r!r}")
        if not _is_real(self.tau):
            raise TypeError(f"EarlyTomConfig.tau must be a float in [-1, 1], got {self.tau!r}")
        if not (finite_number(self.tau) and -1.0 <= self.tau <= 1.0):
            raise ValueError(f"EarlyTomConfig.tau must be in [-1, 1], got {self.tau!r}")
        if not isinstance(self.max_window, int) or isinstance(self.max_window, bool):
            raise TypeError(f"EarlyTomConfig.max_window must be an int >= 2, got {self.max_window!r}")
        if not 2 <= self.max_window < 2**63:  # the ops take an int64
            raise ValueError(f"EarlyTomConfig.max_window must be in [2, 2**63), got {self.max_window}")
        if not _is_real(self.ema):
            raise TypeError(f"EarlyTomConfig.ema must be a float in [0, 1], got {self.ema!r}")
        if not (finite_number(self.ema) and 0.0 <= self.ema <= 1.0):
            raise ValueError(f"EarlyTomConfig.ema must be in [0, 1], got {self.ema!r}")
        if not isinstance(self.keep_last_interior, bool):
            raise TypeError(f"EarlyTomConfig.keep_last_interior must be a bool, got {self.keep_last_interior!r}")
        layers = self.prune_layers
        if layers is None:  # the model family's layers, set by apply
            return self.check_depths(num_layers, llm_num_layers)
        if len(layers) == 0:
            raise ValueError("EarlyTomConfig.prune_layers must name at least one encoder layer")
        for p in layers:
            if not isinstance(p, int) or isinstance(p, bool):
                raise TypeError(f"EarlyTomConfig.prune_layers must hold ints, got {p!r} in {layers}")
            if p < 0:
                raise ValueError(f"EarlyTomConfig.prune_layers must be non-negative, got {layers}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"EarlyTomConfig.prune_layers must be strictly increasing, got {layers}")
        return self.check_depths(num_layers, llm_num_layers)

    def check_depths(self, num_layers: int | None = None, llm_num_layers: int | None = None) -> EarlyTomConfig:
        """The model-dependent bounds only (the fields were checked when the frozen config was built):
        the prune layers below the encoder depth ``num_layers``, ``llm_merge_layer`` below the language
        model's depth ``llm_num_layers``. Returns ``self``."""
        layers = self.prune_layers
        if num_layers is not None and (not _is_int(num_layers) or num_layers < 1):
            raise ValueError(f"num_layers must be a positive int (the vision encoder's depth), got {num_layers!r}")
        if num_layers is not None and layers is not None and layers[-1] >= num_layers:
            raise ValueError(
                f"EarlyTomConfig.prune_layers must be below the vision encoder depth {num_layers} "
                f"(layers 0..{num_layers - 1}), got {layers}"
            )
        check_llm_merge(self.llm_merge_layer, self.llm_merge_ratio, llm_num_layers)
        return self

    def replace(self, **changes) -> EarlyTomConfig:
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name; ``prune_layers`` as a list or ``None`` (JSON-ready). ``from_dict``
        inverts it."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.prune_layers is not None:
            d["prune_layers"] = list(self.prune_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EarlyTomConfig:
        """A config from a mapping of field names (missing fields take their defaults; lists are
        accepted for ``prune_layers``). Unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, Mapping):
            raise TypeError(f"EarlyTomConfig.from_dict expects a mapping of field names, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted((k for k in d if k not in known), key=str)
        if unknown:
            raise ValueError(f"EarlyTomConfig.from_dict: unknown keys {unknown}; the fields are {known}")
        return cls(**d)


def _paper(tau: float, layers: tuple[int, int, int], r: float) -> EarlyTomConfig:
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


#: The inner-LLM merge the published evaluation scripts run with (``INNER_k=18``, ``INNER_r=0.5``).
PAPER_LLM_MERGE = MappingProxyType({"llm_merge_layer": 18, "llm_merge_ratio": 0.5})


def preset(benchmark: str = "videomme", retain_ratio: float = 0.1, llm_merge: bool = False) -> EarlyTomConfig:
    """The paper's setting for ``benchmark`` at ``retain_ratio`` (LLaVA-OneVision-7B).

    ``benchmark`` is one of ``mvbench``, ``videomme``, ``longvideobench``, ``egoschema``;
    ``retain_ratio`` one of 0.10, 0.15, 0.20, 0.25. ``llm_merge=True`` adds the inner-LLM merge
    of the published scripts (:data:`PAPER_LLM_MERGE`: k = 18, r_in = 0.5); off by default.
    """
    if not isinstance(llm_merge, bool):
        raise TypeError(f"preset: llm_merge must be a bool, got {llm_merge!r}")
    cfg = _preset(benchmark, retain_ratio)
    return cfg.replace(**PAPER_LLM_MERGE) if llm_merge else cfg


def _preset(benchmark: str, retain_ratio: float) -> EarlyTomConfig:
    if not isinstance(benchmark, str):
        raise TypeError(f"benchmark must be a str, one of {sorted(PAPER_PRESETS)}, got {benchmark!r}")
    key = benchmark.lower().replace("-", "").replace("_", "")
    if key not in PAPER_PRESETS:
        raise ValueError(f"benchmark must be one of {sorted(PAPER_PRESETS)}, got {benchmark!r}")
    table = PAPER_PRESETS[key]
    if not _is_real(retain_ratio):
        raise TypeError(f"retain_ratio for preset must be one of {sorted(table)}, got {retain_ratio!r}")
    if not finite_number(retain_ratio):
        raise ValueError(f"retain_ratio for preset must be one of {sorted(table)}, got {retain_ratio!r}")
    for r, cfg in table.items():
        if abs(r - retain_ratio) < 1e-9:
            return cfg
    raise ValueError(f"retain_ratio for preset must be one of {sorted(table)}, got {retain_ratio!r}")
