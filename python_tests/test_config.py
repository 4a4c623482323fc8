import pytest

from earlytom_ext import EarlyTomConfig, PAPER_PRESETS, preset


def test_defaults_are_the_specs():
    c = EarlyTomConfig()
    assert (c.retain_ratio, c.tau, c.max_window, c.ema, c.prune_layers, c.keep_last_interior) == (
        0.1, 0.6, 8, 0.9, (6, 21, 23), False)


@pytest.mark.parametrize("field,value,exc,needle", [
    ("retain_ratio", 0.0, ValueError, "(0, 1]"),
    ("retain_ratio", 1.5, ValueError, "(0, 1]"),
    ("retain_ratio", float("nan"), ValueError, "retain_ratio"),
    ("retain_ratio", "0.1", TypeError, "retain_ratio"),
    ("tau", 1.01, ValueError, "[-1, 1]"),
    ("tau", -1.5, ValueError, "tau"),
    ("max_window", 1, ValueError, ">= 2"),
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
])
def test_validation_names_field_and_range(field, value, exc, needle):
    with pytest.raises(exc) as e:
        EarlyTomConfig(**{field: value})
    assert field in str(e.value) and needle in str(e.value)


def test_edges_are_valid():
    EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, ema=0.0, prune_layers=[0])
    EarlyTomConfig(tau=1.0, ema=1.0)


def test_prune_layers_checked_against_depth():
    c = EarlyTomConfig(prune_layers=(6, 21, 23))
    c.validate(num_layers=26)
    with pytest.raises(ValueError, match="encoder depth 20"):
        c.validate(num_layers=20)


def test_list_prune_layers_become_tuple_and_replace_validates():
    c = EarlyTomConfig(prune_layers=[1, 2])
    assert c.prune_layers == (1, 2)
    assert c.replace(retain_ratio=0.2).retain_ratio == 0.2
    with pytest.raises(ValueError):
        c.replace(retain_ratio=2.0)


def test_paper_presets():
    c = preset("videomme", 0.1)
    assert (c.tau, c.prune_layers, c.max_window, c.ema) == (0.3, (10, 21, 23), 6, 0.9)
    assert preset("VideoMME", 0.2).prune_layers == (8, 21, 23)
    assert preset("longvideobench", 0.25).prune_layers == (4, 14, 24)
    assert len(PAPER_PRESETS) == 4 and all(len(t) == 4 for t in PAPER_PRESETS.values())
    with pytest.raises(ValueError, match="benchmark"):
        preset("imagenet", 0.1)
    with pytest.raises(ValueError, match="retain_ratio"):
        preset("mvbench", 0.3)
