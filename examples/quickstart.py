"""EarlyTom on LLaVA-OneVision-0.5B: compress a video inside the vision encoder, then generate.

Run: python examples/quickstart.py [--video clip.mp4]   (downloads the checkpoint once, ~2 GB)
"""

import argparse
from typing import Optional

import torch
from transformers import AutoConfig, AutoProcessor, LlavaOnevisionForConditionalGeneration

import earlytom_ext
from earlytom_ext.demo import load_video, synthetic_frames


def main(
    model_id: str = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    video: Optional[str] = None,
    num_frames: int = 32,
    max_new_tokens: int = 64,
) -> str:
    # A video is a list of frames: [H, W, 3] uint8 arrays (PIL images work too), from a file or synthetic.
    # Decoded first, so that a wrong path fails before the download.
    clip = load_video(video, num_frames) if video else synthetic_frames(num_frames)  # [T, 3, H, W] uint8
    frames = [frame.permute(1, 2, 0).numpy() for frame in clip]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_type = AutoConfig.from_pretrained(model_id).model_type  # checked before the weights download
    if model_type != "llava_onevision":
        raise ValueError(f"{model_id} is a {model_type!r} model; this example runs LLaVA-OneVision (see examples/)")
    # `dtype=` works with transformers 4.57.x and 5.x (older releases called it `torch_dtype`).
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_id)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt").to(device, dtype=dtype)

    # The paper's VideoMME settings at 10% of the video tokens; EarlyTomConfig(retain_ratio=0.1) also works.
    handle = earlytom_ext.apply(model, earlytom_ext.preset("videomme", 0.1))
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(answer)
    print(handle.summary())  # frames after each prune layer, tokens before/after, time per stage
    handle.remove()  # the model is exactly as before
    return answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="EarlyTom quick start on LLaVA-OneVision")
    parser.add_argument("--model", default="llava-hf/llava-onevision-qwen2-0.5b-ov-hf", help="checkpoint folder or id")
    parser.add_argument("--video", default=None, help="a video file (default: a synthetic clip)")
    args = parser.parse_args()
    main(model_id=args.model, video=args.video)
