"""EarlyTom on LLaVA-NeXT-Video-7B (or a Video-LLaVA checkpoint): compress a video inside the vision
encoder, then generate.

Run: python examples/llava_next_video.py [--video clip.mp4]   (downloads the checkpoint once, ~14 GB)
     python examples/llava_next_video.py --model LanguageBind/Video-LLaVA-7B-hf   (8 frames by default)
"""

import argparse
from typing import Optional

import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    LlavaNextVideoForConditionalGeneration,
    VideoLlavaForConditionalGeneration,
)

import earlytom_ext
from earlytom_ext.demo import load_video, synthetic_frames

# model_type -> (model class, frames by default: 32 for LLaVA-NeXT-Video, 8 for Video-LLaVA as in its paper)
FAMILIES = {
    "llava_next_video": (LlavaNextVideoForConditionalGeneration, 32),
    "video_llava": (VideoLlavaForConditionalGeneration, 8),
}
QUESTION = "Describe the video."


def main(
    model_id: str = "llava-hf/LLaVA-NeXT-Video-7B-hf",
    video: Optional[str] = None,
    num_frames: Optional[int] = None,
    max_new_tokens: int = 64,
) -> str:
    model_type = AutoConfig.from_pretrained(model_id).model_type  # checked before the weights download
    if model_type not in FAMILIES:
        raise ValueError(f"{model_id} is a {model_type!r} model; this example runs LLaVA-NeXT-Video and Video-LLaVA")
    model_class, default_frames = FAMILIES[model_type]
    # Frames sampled uniformly, [T, 3, H, W] uint8; decoded first, so that a wrong path fails before the download.
    num_frames = default_frames if num_frames is None else num_frames
    clip = load_video(video, num_frames) if video else synthetic_frames(num_frames)
    frames = [frame.permute(1, 2, 0).numpy() for frame in clip]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model_class.from_pretrained(model_id, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_id)
    if model_type == "video_llava":  # the prompt format of the Video-LLaVA checkpoints
        prompt = f"USER: <video>\n{QUESTION} ASSISTANT:"
    else:
        content = [{"type": "video"}, {"type": "text", "text": QUESTION}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
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
    parser = argparse.ArgumentParser(description="EarlyTom quick start on LLaVA-NeXT-Video and Video-LLaVA")
    parser.add_argument("--model", default="llava-hf/LLaVA-NeXT-Video-7B-hf", help="checkpoint folder or id")
    parser.add_argument("--video", default=None, help="a video file (default: a synthetic clip)")
    parser.add_argument(
        "--frames", type=int, default=None, help="frames sampled uniformly (default: 32; Video-LLaVA: 8)"
    )
    args = parser.parse_args()
    main(model_id=args.model, video=args.video, num_frames=args.frames)
