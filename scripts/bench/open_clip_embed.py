"""open_clip reference for the embedder benchmark: random-weight CLIP image
encoder, random pixels, `encode_image` under `torch.inference_mode()`, images
per second per batch size. Same output format as
`cargo run --example embed_throughput`.

    python scripts/bench/open_clip_embed.py --arch vit_b16 --device cpu --batches 1,8 --seconds 20
"""
import argparse
import time

import open_clip
import torch

# The -quickgelu variants use the activation OpenAI trained with, as ours.
ARCHS = {"vit_b16": "ViT-B-16-quickgelu", "rn50": "RN50-quickgelu"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_b16", choices=sorted(ARCHS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = open_clip.create_model(ARCHS[args.arch], pretrained=None).visual.eval().to(args.device)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    model = model.to(dtype)
    size = model.image_size if isinstance(model.image_size, tuple) else (model.image_size,) * 2
    print(f"# open_clip {open_clip.__version__} torch {torch.__version__}: arch={args.arch} "
          f"device={args.device} precision={args.precision} threads={torch.get_num_threads()} "
          f"input={size[0]}x{size[1]}")
    for batch in (int(b) for b in args.batches.split(",")):
        pixels = torch.randn(batch, 3, *size)
        with torch.inference_mode():
            for _ in range(2):
                embed(model, pixels, args.device, dtype)
            images, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds or images == 0:
                embed(model, pixels, args.device, dtype)
                images += batch
            rate = images / (time.perf_counter() - start)
        print(f"python batch={batch} images_per_s={rate:.3f}")


def embed(model, pixels, device, dtype):
    # Same work as the Rust embedder: move in, forward, normalise in f32, copy back.
    x = pixels.to(device).to(dtype)
    f = model(x).float()
    return torch.nn.functional.normalize(f, dim=-1).cpu()


if __name__ == "__main__":
    main()
