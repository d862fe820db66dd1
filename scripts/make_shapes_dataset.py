#!/usr/bin/env python
"""Build a synthetic captioned image dataset (coloured shapes), offline, in a second.

    python scripts/make_shapes_dataset.py OUT [--num_images 48] [--seed 0] [--layout imagefolder|txt]

layout imagefolder (default): OUT/train/0000.png … + OUT/train/metadata.jsonl with {"file_name", "text"}, the
layout `datasets.load_dataset("imagefolder", data_dir=OUT)` and `--dataset OUT` read.
layout txt: OUT/0000.png + OUT/0000.txt (kohya's layout, for `--train_data_dir OUT`).

Captions read like "a red circle on a blue background"; images come in a few sizes and aspect ratios so the
size conditioning (original size, crop) is exercised.
"""
import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
          "purple": (140, 60, 180), "white": (245, 245, 245), "black": (15, 15, 15), "orange": (250, 140, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((96, 96), (128, 96), (96, 128), (160, 96))  # (width, height)


def draw_sample(rng):
    shape = rng.choice(SHAPES)
    fg, bg = rng.sample(sorted(COLORS), 2)
    w, h = rng.choice(SIZES)
    img = Image.new("RGB", (w, h), COLORS[bg])
    d = ImageDraw.Draw(img)
    r = rng.randint(min(w, h) // 5, min(w, h) // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--num_images", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("imagefolder", "txt"), default="imagefolder")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    folder = os.path.join(args.out, "train") if args.layout == "imagefolder" else args.out
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(args.num_images):
        img, caption = draw_sample(rng)
        name = f"{i:04d}.png"
        img.save(os.path.join(folder, name))
        if args.layout == "txt":
            with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
                f.write(caption + "\n")
        rows.append({"file_name": name, "text": caption})
    if args.layout == "imagefolder":
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{args.num_images} captioned shape images ({args.layout} layout) written to {folder}")


if __name__ == "__main__":
    sys.exit(main())
