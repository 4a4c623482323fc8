"""EarlyTom on LLaVA-NeXT-Video-7B: compress a video inside the vision encoder, then generate.

Run: python examples/llava_next_video.py [--video clip.mp4]   (downloads the checkpoint once, ~14 GB)
"""

import argparse
from typing import Optional

import torch
from transformers import AutoConfig, AutoProcessor, LlavaNextVideoForConditionalGeneration

import earlytom_ext
from earlytom_ext.demo import load_video, synthetic_frames


def main(
    model_id: str = "llava-hf/LLaVA-NeXT-Video-7B-hf",
    video: Optional[str] = None,
    num_frames: int = 32,
    max_new_tokens: int = 64,
) -> str:
    # Frames sampled uniformly, [T, 3, H, W] uint8; decoded first, so that a wrong path fails before the download.
    clip = load_video(video, num_frames) if video else synthetic_frames(num_frames)
    frames = [frame.permute(1, 2, 0).numpy() for frame in clip]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_type = AutoConfig.from_pretrained(model_id).model_type  # checked before the weights download
    if model_type != "llava_next_video":
        raise ValueError(f"{model_id} is a {model_type!r} model; this example runs LLaVA-NeXT-Video")
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_id)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt").to(device, dtype=dtype)

    # The paper's VideoMME settings at 10% of the video tokens; prune_layers=None lets apply choose this
    # family's own layers (the presets' are SigLIP's), as earlytom_ext.apply(model) alone does.
    cfg = earlytom_ext.preset("videomme", 0.1).replace(prune_layers=None)
    with earlytom_ext.apply(model, cfg) as handle:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        print(handle.summary())  # frames after each prune layer, tokens before/after, time per stage
    # Leaving the `with` block restores the model exactly.
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(answer)
    return answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="EarlyTom quick start on LLaVA-NeXT-Video")
    parser.add_argument("--model", default="llava-hf/LLaVA-NeXT-Video-7B-hf", help="checkpoint folder or id")
    parser.add_argument("--video", default=None, help="a video file (default: a synthetic clip)")
    parser.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (default 32)")
    args = parser.parse_args()
    main(model_id=args.model, video=args.video, num_frames=args.frames)
