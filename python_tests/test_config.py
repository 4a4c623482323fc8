import pytest

from earlytom_ext import PAPER_PRESETS, EarlyTomConfig, preset


def test_defaults_are_the_specs():
    c = EarlyTomConfig()
    assert (c.retain_ratio, c.tau, c.max_window, c.ema, c.prune_layers, c.keep_last_interior) == (
        0.1,
        0.6,
        8,
        0.9,
        None,  # the model family's own, chosen by apply
        False,
    )


@pytest.mark.parametrize(
    "field,value,exc,needle",
    [
        ("retain_ratio", 0.0, ValueError, "(0, 1]"),
        ("retain_ratio", 1.5, ValueError, "(0, 1]"),
        ("retain_ratio", float("nan"), ValueError, "retain_ratio"),
        ("retain_ratio", "0.1", TypeError, "retain_ratio"),
        ("tau", 1.01, ValueError, "[-1, 1]"),
        ("tau", -1.5, ValueError, "tau"),
        ("max_window", 1, ValueError, "[2, 2**63)"),
        ("max_window", 2**63, ValueError, "[2, 2**63)"),  # the ops take an int64
        ("retain_ratio", 10**400, ValueError, "(0, 1]"),  # beyond the float range: no OverflowError
        ("tau", -(10**400), ValueError, "[-1, 1]"),
        ("ema", 10**400, ValueError, "[0, 1]"),
        ("llm_merge_ratio", 10**400, ValueError, "[0, 1)"),
        ("max_window", 2.5, TypeError, "max_window"),
        ("ema", -0.1, ValueError, "[0, 1]"),
        ("ema", 1.1, ValueError, "ema"),
        ("prune_layers", (), ValueError, "at least one"),
        ("prune_layers", (3, 3), ValueError, "strictly increasing"),
        ("prune_layers", (5, 2), ValueError, "strictly increasing"),
        ("prune_layers", (-1, 2), ValueError, "non-negative"),
        ("prune_layers", (1.0,), TypeError, "ints"),
        ("prune_layers", 3, TypeError, "sequence"),
        ("keep_last_interior", 1, TypeError, "bool"),
    ],
)
def test_validation_names_field_and_range(field, value, exc, needle):
    with pytest.raises(exc) as e:
        EarlyTomConfig(**{field: value})
    assert field in str(e.value) and needle in str(e.value)


CORE = ("retain_ratio", "tau", "max_window", "ema", "prune_layers", "keep_last_interior")


def core(c: EarlyTomConfig) -> dict:
    """The encoder-side fields (docs/algorithm.md parameters) of a config."""
    return {name: getattr(c, name) for name in CORE}


def test_edges_are_valid_and_stored():
    c = EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, ema=0.0, prune_layers=[0])
    assert core(c) == {
        "retain_ratio": 1.0,
        "tau": -1.0,
        "max_window": 2,
        "ema": 0.0,
        "prune_layers": (0,),
        "keep_last_interior": False,
    }
    assert c.to_dict()["prune_layers"] == [0]  # JSON-ready list; the config itself holds a tuple
    c = EarlyTomConfig(tau=1.0, ema=1.0, keep_last_interior=True)
    assert core(c) == {
        "retain_ratio": 0.1,
        "tau": 1.0,
        "max_window": 8,
        "ema": 1.0,
        "prune_layers": None,
        "keep_last_interior": True,
    }
    # ints are accepted for the real-valued fields and stored as given
    c = EarlyTomConfig(retain_ratio=1, tau=0, ema=1)
    assert (c.retain_ratio, c.tau, c.ema) == (1, 0, 1)


def test_prune_layers_checked_against_depth():
    c = EarlyTomConfig(prune_layers=(6, 21, 23))
    assert c.validate(num_layers=26) is c
    assert c.validate(num_layers=24) is c  # the last layer (23) of a 24-layer encoder
    with pytest.raises(ValueError, match="encoder depth 23"):
        c.validate(num_layers=23)
    with pytest.raises(ValueError, match="encoder depth 20"):
        c.validate(num_layers=20)
    for bad in (23.5, float("nan"), "26", True, 0):
        with pytest.raises(ValueError, match=r"num_layers must be a positive int \(the vision encoder's depth\)"):
            c.validate(num_layers=bad)


def test_prune_layers_none_is_left_to_the_model():
    c = EarlyTomConfig(retain_ratio=0.25, prune_layers=None)
    assert c.prune_layers is None and c == EarlyTomConfig(retain_ratio=0.25)
    assert c.validate(num_layers=2) is c  # no depth to check before a model chooses the layers
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        c.validate(num_layers=0)
    assert c.to_dict()["prune_layers"] is None
    assert EarlyTomConfig.from_dict(c.to_dict()) == c
    assert preset("videomme", 0.1).replace(prune_layers=None).prune_layers is None
    assert EarlyTomConfig(prune_layers=(6, 21, 23)).replace(prune_layers=None) == EarlyTomConfig()


@pytest.mark.parametrize("layers", [[1, 2], (1, 2), range(1, 3), (i for i in (1, 2))])
def test_prune_layers_normalised_to_a_tuple(layers):
    c = EarlyTomConfig(prune_layers=layers)
    assert c.prune_layers == (1, 2) and type(c.prune_layers) is tuple
    assert hash(c) == hash(EarlyTomConfig(prune_layers=(1, 2)))  # frozen and hashable
    assert c == EarlyTomConfig(prune_layers=(1, 2))


def test_replace_changes_one_field_and_validates():
    c = EarlyTomConfig(tau=0.3, max_window=6, prune_layers=[1, 2])
    r = c.replace(retain_ratio=0.2)
    assert core(r) == {
        "retain_ratio": 0.2,
        "tau": 0.3,
        "max_window": 6,
        "ema": 0.9,
        "prune_layers": (1, 2),
        "keep_last_interior": False,
    }
    assert c.retain_ratio == 0.1  # the original is unchanged
    assert c.replace(prune_layers=[4, 5]).prune_layers == (4, 5)
    with pytest.raises(ValueError, match="retain_ratio"):
        c.replace(retain_ratio=2.0)
    with pytest.raises(AttributeError):
        c.tau = 0.5  # frozen


# The paper's table (docs/algorithm.md), LLaVA-OneVision-7B: (tau, prune layers) per retain ratio.
PAPER_TABLE = {
    "mvbench": {
        0.10: (0.65, (8, 14, 20)),
        0.15: (0.8, (6, 14, 20)),
        0.20: (0.8, (6, 14, 20)),
        0.25: (0.8, (6, 14, 20)),
    },
    "videomme": {
        0.10: (0.3, (10, 21, 23)),
        0.15: (0.4, (8, 21, 23)),
        0.20: (0.5, (8, 21, 23)),
        0.25: (0.7, (10, 21, 23)),
    },
    "longvideobench": {
        0.10: (0.3, (10, 21, 23)),
        0.15: (0.5, (10, 21, 23)),
        0.20: (0.6, (10, 21, 23)),
        0.25: (0.8, (4, 14, 24)),
    },
    "egoschema": {
        0.10: (0.3, (10, 21, 23)),
        0.15: (0.5, (10, 21, 23)),
        0.20: (0.6, (10, 21, 23)),
        0.25: (0.7, (10, 21, 23)),
    },
}


@pytest.mark.parametrize("benchmark,r", [(b, r) for b in PAPER_TABLE for r in (0.10, 0.15, 0.20, 0.25)])
def test_paper_presets_equal_the_table(benchmark, r):
    tau, layers = PAPER_TABLE[benchmark][r]
    c = preset(benchmark, r)
    assert core(c) == {
        "retain_ratio": r,
        "tau": tau,
        "max_window": 6,
        "ema": 0.9,
        "prune_layers": layers,
        "keep_last_interior": False,
    }
    assert PAPER_PRESETS[benchmark][r] == c


def test_paper_presets_lookup():
    assert sorted(PAPER_PRESETS) == ["egoschema", "longvideobench", "mvbench", "videomme"]
    assert all(sorted(t) == [0.10, 0.15, 0.20, 0.25] for t in PAPER_PRESETS.values())
    # names are case-, dash- and underscore-insensitive; ratios match within 1e-9
    assert preset("VideoMME", 0.2).prune_layers == (8, 21, 23)
    assert preset("Long-Video_Bench", 0.25).prune_layers == (4, 14, 24)
    assert preset("egoschema", 0.1 + 1e-12).tau == 0.3
    assert preset() == preset("videomme", 0.1)  # defaults
    with pytest.raises(ValueError, match="benchmark"):
        preset("imagenet", 0.1)
    with pytest.raises(ValueError, match="retain_ratio"):
        preset("mvbench", 0.3)


@pytest.mark.parametrize("ratio", ["0.1", None, [0.1]])
def test_preset_ratio_of_a_wrong_type(ratio):
    with pytest.raises(TypeError, match="retain_ratio for preset must be one of"):
        preset("videomme", ratio)


def test_huge_ints_for_real_arguments_are_value_errors():
    import torch

    from earlytom_ext import ops

    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="scale"):
        ops.attention_received(q, q, scale=10**400)
    with pytest.raises(ValueError, match="retain_ratio"):
        ops.stage2_plan([[(0, 1)]], [2], 10**400, tokens_per_frame=4)
    with pytest.raises(ValueError, match="retain_ratio for preset"):
        preset("videomme", 10**400)
