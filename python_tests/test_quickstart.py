"""examples/quickstart.py (the README's "Quick start" code) on a tiny random LLaVA-OneVision
checkpoint saved to a temporary folder, loaded through the same ``from_pretrained`` calls as a
real one (nothing is downloaded); and the README shows exactly that file."""

import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")
README = os.path.join(ROOT, "README.md")


def readme_quickstart_block() -> str:
    """The ```python block of README.md's "## Quick start" section."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## Quick start\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README.md has no '## Quick start' section"
    blocks = re.findall(r"^```python\n(.*?)^```$", m.group(1), flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one python block in Quick start, found {len(blocks)}"
    return blocks[0]


def test_readme_shows_the_quickstart_file():
    with open(QUICKSTART, encoding="utf-8") as f:
        body = f.read()
    assert readme_quickstart_block() == body, "README's Quick start block and examples/quickstart.py differ"


def save_tiny_checkpoint(path: str, vision_layers: int = 26, seed: int = 0) -> str:
    """Save a tiny random LLaVA-OneVision model and a working processor for it to ``path``.

    The processor is the real ``LlavaOnevisionProcessor`` (image and video processors as in the
    checkpoints) with a word-level tokenizer over the tiny model's vocabulary: ``<image>`` and
    ``<video>`` map to the model's placeholder ids, every other word to ``<unk>``.
    """
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("the LLaVA-OneVision video processor needs torchvision")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
    )

    from earlytom_ext import tiny_model as tm

    special = {
        "<pad>": tm.PAD_ID,
        "<s>": 1,
        "</s>": 2,
        "<unk>": 3,
        "<image>": tm.IMAGE_TOKEN_ID,
        "<video>": tm.VIDEO_TOKEN_ID,
    }
    taken = set(special.values())
    vocab = {f"w{i}": i for i in range(tm.VOCAB) if i not in taken}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<video>"],
        model_input_names=["input_ids", "attention_mask"],  # like Qwen2's tokenizer: no token_type_ids
    )
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'video' %}<video> {% elif c['type'] == 'image' %}<image> "
        "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=tm.GRID * tm.GRID,
        vision_feature_select_strategy="full",
        chat_template=template,
    )
    tm.build_model(vision_layers=vision_layers, seed=seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-llava-ov")))


def _load_quickstart():
    spec = importlib.util.spec_from_file_location("earlytom_quickstart", QUICKSTART)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_runs_on_a_local_checkpoint(checkpoint, capsys):
    quickstart = _load_quickstart()
    answer = quickstart.main(model_id=checkpoint, num_frames=4, max_new_tokens=3)
    printed = capsys.readouterr().out
    # The answer is the decoded new tokens only: the tiny tokenizer's words are "w<id>" (or <unk>).
    assert isinstance(answer, str) and answer.strip(), printed
    assert len(answer.split()) <= 3 and all(re.fullmatch(r"w\d+|<unk>", w) for w in answer.split()), answer
    assert "user:" not in answer  # the prompt is not part of it
    # handle.summary() was printed: one video of 4 frames, 4 x 196 + 1 tokens before compression.
    assert "tokens before" in printed and f" {4 * 196 + 1} " in printed, printed
    assert answer in printed


def test_quickstart_default_model_id():
    # The README promises the example runs with this checkpoint.
    import inspect

    quickstart = _load_quickstart()
    assert inspect.signature(quickstart.main).parameters["model_id"].default == (
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
