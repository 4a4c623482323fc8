"""EarlyTom on Qwen2.5-VL-3B-Instruct (or a Qwen2-VL checkpoint): compress a video inside the vision
encoder, then generate.

Run: python examples/qwen2_5_vl.py [--video clip.mp4]   (downloads the checkpoint once, ~7.5 GB)
     python examples/qwen2_5_vl.py --model Qwen/Qwen2-VL-2B-Instruct
"""

import argparse
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import earlytom_ext
from earlytom_ext.demo import clip_seconds, load_video, synthetic_frames

FAMILIES = ("qwen2_5_vl", "qwen2_vl")


def main(
    model_id: str = "Qwen/Qwen2.5-VL-3B-Instruct",
    video: Optional[str] = None,
    num_frames: int = 32,
    fps: Optional[float] = None,
    max_new_tokens: int = 64,
) -> str:
    # Frames sampled uniformly, [T, 3, H, W] uint8; decoded first, so that a wrong path fails before the download.
    clip = load_video(video, num_frames, size=448) if video else synthetic_frames(num_frames, size=448)
    frames = [frame.permute(1, 2, 0).numpy() for frame in clip]
    # The model places the frames in time from the rate of the sampled frames.
    if fps is None:
        seconds = clip_seconds(video) if video else None
        fps = num_frames / seconds if seconds else 2.0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_type = AutoConfig.from_pretrained(model_id).model_type  # checked before the weights download
    if model_type not in FAMILIES:
        raise ValueError(f"{model_id} is a {model_type!r} model; this example runs Qwen2.5-VL and Qwen2-VL")
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_id)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    # The frame rate reaches the processor as `fps` (transformers 4.57) and as `video_metadata` (5.x);
    # Qwen2.5-VL places the frames in time from it, Qwen2-VL counts temporal groups.
    metadata = [{"fps": fps, "total_num_frames": len(frames)}]
    inputs = processor(text=prompt, videos=[frames], fps=fps, video_metadata=metadata, return_tensors="pt")
    inputs = inputs.to(device)  # pixels stay float32: the vision encoder casts them itself

    # The paper's VideoMME settings at 10% of the video tokens; prune_layers=None lets apply choose the
    # family's own layers (the presets' are SigLIP's), as earlytom_ext.apply(model) alone does.
    cfg = earlytom_ext.preset("videomme", 0.1).replace(prune_layers=None)
    with earlytom_ext.apply(model, cfg) as handle:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        print(handle.summary())  # temporal groups after each prune layer, tokens before/after, time per stage
    # Leaving the `with` block restores the model exactly.
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(answer)
    return answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="EarlyTom quick start on Qwen2.5-VL and Qwen2-VL")
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct", help="checkpoint folder or id")
    parser.add_argument("--video", default=None, help="a video file (default: a synthetic clip)")
    parser.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (default 32)")
    parser.add_argument(
        "--fps", type=float, default=None, help="rate of the sampled frames (default: frames / clip seconds; 2.0)"
    )
    args = parser.parse_args()
    main(model_id=args.model, video=args.video, num_frames=args.frames, fps=args.fps)
