"""The data path: messy images, captions, bucketing, the sampler, and the disk cache."""
import codecs
import io
import json
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, PngImagePlugin, TiffImagePlugin
from packaging.version import Version
from safetensors import safe_open

import train_sdxl_debias as T
from conftest import ROOT, run_trainer


def save_jpeg_with_orientation(path, img, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes())


def make_messy_folder(folder):
    """Every awkward case at once: image modes, EXIF rotation, tiny/wide/tall images, a corrupt file, a
    truncated file, a list-of-captions column with an empty list, a missing caption."""
    os.makedirs(folder, exist_ok=True)
    rgba = Image.new("RGBA", (80, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (20, 20, 40, 40))
    rgba.save(os.path.join(folder, "rgba.png"))
    Image.new("LA", (64, 80), (128, 0)).save(os.path.join(folder, "la.png"))
    Image.new("P", (70, 70), 3).save(os.path.join(folder, "palette.png"))
    Image.new("CMYK", (72, 64), (0, 255, 255, 0)).save(os.path.join(folder, "cmyk.jpg"))
    Image.fromarray(np.full((64, 96), 40000, dtype=np.uint16)).save(os.path.join(folder, "grey16.png"))
    save_jpeg_with_orientation(os.path.join(folder, "rotated.jpg"), Image.new("RGB", (96, 64), (0, 200, 0)), 6)
    Image.new("RGB", (20, 16), (9, 9, 9)).save(os.path.join(folder, "tiny.png"))
    Image.new("RGB", (400, 40), (200, 200, 0)).save(os.path.join(folder, "wide.png"))
    Image.new("RGB", (40, 300), (0, 200, 200)).save(os.path.join(folder, "tall.png"))
    with open(os.path.join(folder, "corrupt.png"), "wb") as f:
        f.write(b"this is not an image at all")
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(os.path.join(folder, "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    captions = {"rgba.png": ["a blue square", "a square on red"], "la.png": ["grey"], "palette.png": [],
                "cmyk.jpg": ["red"], "grey16.png": [""], "rotated.jpg": ["green"], "tiny.png": ["tiny"],
                "wide.png": ["a wide yellow bar"], "tall.png": ["a tall cyan bar"], "corrupt.png": ["broken"],
                "truncated.jpg": ["half a file"]}
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for name, caps in captions.items():
            f.write(json.dumps({"file_name": name, "captions": caps}) + "\n")
    return folder


def test_image_modes_are_upright_rgb_and_transparency_is_white(tmp_path, monkeypatch):
    folder = make_messy_folder(str(tmp_path / "messy"))
    rgba = T.open_image(os.path.join(folder, "rgba.png"))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent red -> white
    assert rgba.getpixel((30, 30)) == (0, 0, 255)
    assert T.open_image(os.path.join(folder, "la.png")).getpixel((0, 0)) == (255, 255, 255)
    grey = T.open_image(os.path.join(folder, "grey16.png"))
    assert grey.mode == "RGB" and abs(grey.getpixel((0, 0))[0] - 40000 / 257) <= 1
    dark16 = Image.frombytes("I;16", (4, 4), np.full((4, 4), 200, dtype="<u2").tobytes())
    assert T.open_image(dark16).getpixel((0, 0)) == (1, 1, 1)  # 200 of 65535 is nearly black, whatever the max
    unit_float = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))  # mode F, values in [0, 1]
    assert T.open_image(unit_float).getpixel((0, 0)) == (128, 128, 128)
    assert T.open_image(os.path.join(folder, "cmyk.jpg")).mode == "RGB"
    assert T.open_image(os.path.join(folder, "palette.png")).mode == "RGB"
    rotated = T.open_image(os.path.join(folder, "rotated.jpg"))
    assert rotated.size == (64, 96)  # EXIF orientation 6: stored 96x64 landscape, shown portrait
    assert T.read_size(os.path.join(folder, "rotated.jpg")) == (64, 96)
    for ext in ("tif", "webp", "png"):  # Pillow turns a TIFF upright as it opens it: not turned twice
        save_jpeg_with_orientation(tmp_path / f"rotated.{ext}", Image.new("RGB", (96, 64), (0, 200, 0)), 6)
        decoded, size = T.decode_image(str(tmp_path / f"rotated.{ext}"))
        assert decoded.size == size == T.read_size(str(tmp_path / f"rotated.{ext}")) == (64, 96), ext
    from PIL import PngImagePlugin
    loads, real_load = [], PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real_load(self))
    Image.new("RGB", (48, 16)).save(tmp_path / "wide.png")
    assert T.read_size(str(tmp_path / "wide.png")) == (48, 16) and not loads  # the header only: no pixels decoded
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (48, 16)).save(tmp_path / "turned.png", exif=exif)  # EXIF in the header: still honoured
    assert T.read_size(str(tmp_path / "turned.png")) == (16, 48)
    monkeypatch.undo()
    with pytest.raises(Exception):
        T.open_image(os.path.join(folder, "truncated.jpg")).load()
    # A 300 MP photo's header reads without PIL's "decompression bomb DOS attack" warning; above 512 MP, an error.
    for name, size in (("300mp.png", (20000, 15000)), ("600mp.png", (30000, 20000))):
        chunks = [b"IHDR" + struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0), b"IDAT", b"IEND"]  # no pixel data
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(
            struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks))
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import train_sdxl_debias as T; "
            f"print(T.read_size({str(tmp_path / '300mp.png')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "(20000, 15000)" and proc.stderr == "", proc.stderr
    with pytest.raises(ValueError, match="larger than the 512 MP this trainer reads: downscale it"):
        T.read_size(str(tmp_path / "600mp.png"))
    for mode, key in (("L", 0), ("RGB", (0, 0, 0))):  # one colour marked transparent, no alpha channel
        Image.new(mode, (8, 8), key).save(tmp_path / f"key-{mode}.png", transparency=key)
        assert T.open_image(str(tmp_path / f"key-{mode}.png")).getpixel((0, 0)) == (255, 255, 255), mode


def rgb_profile(colorants, name):
    """A minimal ICC v2 display profile: D50-adapted primaries (XYZ of R, G, B) and sRGB's transfer curve."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    curve = b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(
        s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    text = name.encode() + b"\0"
    tags = [(b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 78),
            (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    tags += [(tag, xyz(*c)) for tag, c in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants)]
    tags += [(tag, curve) for tag in (b"rTRC", b"gTRC", b"bTRC")]
    start, table, data = 132 + 12 * len(tags), b"", b""
    for tag, body in tags:
        body += b"\0" * (-len(body) % 4)
        table, data = table + tag + struct.pack(">II", start + len(data), len(body)), data + body
    header = struct.pack(">I", start + len(data)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
    header = (header + b"\0" * 12 + b"acsp").ljust(68, b"\0") + s15(0.9642) + s15(1.0) + s15(0.8249)
    return header.ljust(128, b"\0") + struct.pack(">I", len(tags)) + table + data


DISPLAY_P3 = rgb_profile([(0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)], "Display P3")


def test_colour_profiles_are_applied(tmp_path):
    """A phone's Display P3 photo trains on its sRGB colours (what a viewer shows), in every decoding path."""
    # P3 (200, 120, 80) in sRGB, from the standard matrices (P3-D65 -> XYZ -> sRGB) and sRGB's curve: (213, 115, 70).
    p3, srgb = (200, 120, 80), (213, 115, 70)
    Image.new("RGB", (64, 48), p3).save(tmp_path / "p3.png", icc_profile=DISPLAY_P3)
    Image.new("RGB", (3000, 2000), p3).save(tmp_path / "p3.jpg", icc_profile=DISPLAY_P3, quality=100, subsampling=0)
    rgba = Image.new("RGBA", (64, 48), p3 + (255,))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "p3a.png", icc_profile=DISPLAY_P3)
    assert T.open_image(str(tmp_path / "p3.png")).getpixel((5, 5)) == srgb
    decoded, size = T.decode_image(str(tmp_path / "p3.jpg"), cover=(64, 64))  # decoded at 1/8 scale: still applied
    assert size == (3000, 2000) and decoded.size == (375, 250)  # (JPEG rounds by 2 levels; untagged is 13 off)
    assert all(abs(a - b) <= 2 for a, b in zip(decoded.getpixel((100, 100)), srgb)), decoded.getpixel((100, 100))
    alpha = T.open_image(str(tmp_path / "p3a.png"))
    assert alpha.getpixel((0, 0)) == (255, 255, 255) and alpha.getpixel((5, 5)) == srgb
    Image.new("RGB", (8, 8), p3).quantize(4).save(tmp_path / "p3p.png", icc_profile=DISPLAY_P3)  # a palette's
    assert T.open_image(str(tmp_path / "p3p.png")).getpixel((1, 1)) == srgb
    with open(tmp_path / "thumb.tif", "w+b") as fp, TiffImagePlugin.AppendingTiffWriter(fp) as tiff:
        for size, kind, icc in (((12, 8), 1, DISPLAY_P3), ((120, 80), 0, None)):  # the thumbnail alone is P3
            extra = {"icc_profile": icc} if icc else {}
            Image.new("RGB", size, p3).save(tiff, format="TIFF", tiffinfo={254: kind}, **extra)
            tiff.newFrame()
    assert T.decode_image(str(tmp_path / "thumb.tif"))[0].getpixel((1, 1)) == p3
    # An sRGB profile, an unreadable one, or one for other pixels (an RGB profile on a greyscale image): as they are.
    srgb_bytes = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, mode, icc in (("srgb", "RGB", srgb_bytes), ("broken", "RGB", b"not a profile"),
                            ("grey", "L", DISPLAY_P3)):
        Image.new(mode, (8, 8), 90 if mode == "L" else p3).save(tmp_path / f"{name}.png", icc_profile=icc)
        assert T.open_image(str(tmp_path / f"{name}.png")).getpixel((1, 1)) == ((90,) * 3 if mode == "L" else p3)


def test_phone_and_tool_exports_decode_as_shown(tmp_path):
    """A TIFF with a thumbnail first (raw converters), a phone's MPO JPEG (depth or gain map inside), a 16-bit
    PNG with a transparent grey, a PNG carrying a large compressed workflow (ComfyUI): each as a viewer shows it."""
    # NewSubfileType 1 (thumbnail) first, 0 (full size) second; a save per page (Pillow < 11.2's save_all gives
    # every page the first one's tags)
    with open(tmp_path / "thumb_first.tif", "w+b") as fp, TiffImagePlugin.AppendingTiffWriter(fp) as tiff:
        for page, kind in ((Image.new("RGB", (12, 8), "red"), 1), (Image.new("RGB", (120, 80), "blue"), 0)):
            page.save(tiff, format="TIFF", tiffinfo={254: kind})
            tiff.newFrame()
    assert T.read_size(str(tmp_path / "thumb_first.tif")) == (120, 80)
    assert T.decode_image(str(tmp_path / "thumb_first.tif"))[0].getpixel((0, 0)) == (0, 0, 255)
    Image.new("RGB", (3000, 2000), "green").save(tmp_path / "phone.jpg", format="MPO", save_all=True,
                                                 append_images=[Image.new("RGB", (300, 200))])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    assert T.decode_image(str(tmp_path / "phone.jpg"), cover=(256, 256))[0].size == (750, 500)  # libjpeg's 1/4
    grey = np.array([[1000] * 4] * 2 + [[5000] * 4] * 2, dtype="<u2")
    Image.frombytes("I;16", (4, 4), grey.tobytes()).save(tmp_path / "grey16.png", transparency=1000)
    grey16 = T.open_image(str(tmp_path / "grey16.png"))
    assert grey16.getpixel((0, 0)) == (255, 255, 255) and grey16.getpixel((0, 3)) == (19, 19, 19)
    workflow = PngImagePlugin.PngInfo()
    workflow.add_itxt("workflow", '{"nodes": []}' * 200000, zip=True)  # 2.6 MB unpacked: past Pillow's 1 MB
    Image.new("RGB", (8, 8)).save(tmp_path / "comfy.png", pnginfo=workflow)
    assert T.open_image(str(tmp_path / "comfy.png")).size == (8, 8)


def test_large_jpegs_decode_at_a_reduced_scale_with_full_size_conditioning(tmp_path):
    """A photo far larger than its bucket is decoded at 1/2..1/8 scale (libjpeg), but crops and add_time_ids
    are those of the full image, and the pixels match a full decode."""
    rng = np.random.RandomState(0)
    ramp = np.linspace(0, 255, 1600)[None, :, None] * np.ones((1200, 1, 3))
    photo = Image.fromarray((ramp * 0.8 + rng.randint(0, 40, (1200, 1600, 3))).clip(0, 255).astype(np.uint8))
    path = str(tmp_path / "photo.jpg")
    save_jpeg_with_orientation(path, photo, 6)  # stored landscape, displayed portrait
    img, size = T.decode_image(path, cover=(192, 256))
    assert size == (1200, 1600) and img.size[0] < 1200 and img.size[0] >= 192 and img.size[1] >= 256
    full, _ = T.decode_image(path)
    assert full.size == (1200, 1600)
    a = T.transform_image(img, (192, 256), True, False, random.Random(0), size=size)
    b = T.transform_image(full, (192, 256), True, False, random.Random(0))
    assert a[1:] == b[1:] == ((1600, 1200), (0, 0))  # original (h, w) and crop of the full image
    assert (a[0] - b[0]).abs().mean() < 0.02  # [-1, 1] pixels: under 1% of the range apart


def test_an_extreme_aspect_ratio_is_cropped_without_resizing_all_of_it():
    banner = Image.linear_gradient("L").convert("RGB").resize((4000, 8))  # a 1024² crop of 512000x1024 resized
    pixels, original, (top, left) = T.transform_image(banner, (64, 64), True, False, random.Random(0))
    assert pixels.shape == (3, 64, 64) and original == (8, 4000) and left == (32000 - 64) // 2
    small = Image.linear_gradient("L").convert("RGB").resize((400, 300))
    full = np.asarray(small.resize((85, 64), Image.Resampling.LANCZOS).crop((10, 0, 74, 64)), dtype=np.float32)
    pixels, _, crop = T.transform_image(small, (64, 64), False, False, random.Random(0), crop=(0, 10))
    assert crop == (0, 10)  # the same pixels as resizing the whole image and cropping (to rounding)
    assert np.abs((pixels.permute(1, 2, 0).numpy() + 1) * 127.5 - full).max() <= 1.0


def test_transform_crop_flip_and_time_ids():
    img = Image.new("RGB", (200, 100))
    img.paste((255, 0, 0), (0, 0, 100, 100))  # left half red
    rng = random.Random(0)
    pixels, original, crop = T.transform_image(img, (64, 64), True, False, rng)
    assert pixels.shape == (3, 64, 64) and original == (100, 200) and crop == (0, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    flipped, _, crop_f = T.transform_image(img, (64, 64), True, True, rng)
    assert crop_f == (0, 128 - 32 - 64)  # the crop's left edge measured in the flipped image
    torch.testing.assert_close(flipped, pixels.flip(-1))
    wide, original, crop = T.transform_image(img, (80, 48), False, False, random.Random(1))
    assert wide.shape == (3, 48, 80)
    ids = T.time_ids(original, crop, (80, 48))
    assert ids.tolist() == [100, 200, crop[0], crop[1], 48, 80]


def test_buckets():
    assert T.make_buckets(1024) == list(T.SDXL_BUCKETS)
    for res in (512, 768, 64, 256):
        for w, h in T.make_buckets(res):
            assert abs(w * h / res ** 2 - 1) < 0.25, (res, w, h)
    buckets = T.make_buckets(1024)
    assert buckets[T.nearest_bucket((4000, 1000), buckets)] == (1536, 640)
    assert buckets[T.nearest_bucket((1000, 1500), buckets)] == (832, 1216)
    assert buckets[T.nearest_bucket((500, 500), buckets)] == (1024, 1024)


def test_every_image_is_drawn_when_a_bucket_is_smaller_than_a_batch():
    buckets = T.make_buckets(1024)
    square, wide, wider, tall = (buckets.index(b) for b in ((1024, 1024), (1344, 768), (1536, 640), (832, 1216)))
    groups = T.merge_small_buckets([square] * 6 + [wide] * 4 + [wider] + [tall], buckets, batch_size=4)
    assert groups == [square] * 6 + [wide] * 4 + [wide] + [square]  # the lone images join the nearest full bucket
    seen = {i for epoch in range(5) for batch in T.BatchSampler(groups, 4, seed=0).batches(epoch) for i in batch}
    assert seen == set(range(12))


def test_sampler_seeded_rank_aware_resumable():
    groups = [i % 3 for i in range(60)]  # three buckets of 20
    ranks = [T.BatchSampler(groups, 4, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [[i for batch in s for i, _ in batch] for s in ranks]
    assert not set(seen[0]) & set(seen[1])  # distinct samples per rank
    assert len(ranks[0]) == len(ranks[1]) == 7  # 15 batches dealt to 2 ranks: 7 each, one dropped
    for batch in ranks[0]:
        assert len({groups[i] for i, _ in batch}) == 1  # one bucket per batch
    again = T.BatchSampler(groups, 4, seed=7, num_replicas=2, rank=0)
    assert [b for b in again] == [b for b in ranks[0]]  # same seed, same order
    again.set_epoch(0, skip=2)
    assert list(again) == list(ranks[0])[2:]  # resume mid-epoch
    again.set_epoch(1)
    assert list(again) != list(ranks[0])  # a new order each epoch


def test_bucketed_batches_have_one_shape_and_true_time_ids(shapes):
    args = T.parse_args(["--dataset", shapes, "--resolution", "64", "--aspect_ratio_bucketing",
                         "--train_batch_size", "2", "--random_flip"])
    table, _ = T.load_table(args)
    table, plan, groups = T.plan_data(args, table, show_progress=False)
    sampler = T.make_sampler(args, groups, _FakeAccelerator())
    loader = T.make_loader(args, table, plan, sampler, _FakeAccelerator())
    assert len(set(groups)) > 1
    for batch in loader:
        pixels, ids = batch["pixel_values"], batch["time_ids"]
        h, w = pixels.shape[-2:]
        assert (ids[:, 4] == h).all() and (ids[:, 5] == w).all()
        assert (ids[:, :2] >= 96).all()  # shapes images are 96-160 px: the true original size, not the target
        assert (ids[:, 2:4] >= 0).all()


def test_upscaled_images_are_named_by_their_bucket(tmp_path, caplog):
    """Upscaling is judged against each image's bucket: a 1344x768 photo fills its bucket at --resolution 1024,
    an icon is named, most enlarged first, with a warning when it trains as a blur."""
    for name, size in (("wide.png", (1344, 768)), ("square.png", (1024, 1024)), ("small.png", (800, 800)),
                       ("icon.png", (16, 16))):
        Image.new("RGB", size, (90, 30, 200)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a picture")
    caplog.set_level(logging.INFO)
    args = T.parse_args(["--dataset", str(tmp_path), "--resolution", "1024", "--aspect_ratio_bucketing"])
    T.plan_data(args, T.load_table(args)[0], show_progress=False)
    line = next(r for r in caplog.records if "upscaled" in r.message)
    assert line.levelname == "WARNING" and line.message.startswith("2 of 4 images")  # not the wide one
    assert line.message.index("icon.png (16x16, 64.0x)") < line.message.index("small.png (800x800, 1.3x)")
    caplog.clear()
    args = T.parse_args(["--dataset", str(tmp_path), "--resolution", "768"])
    T.plan_data(args, T.load_table(args)[0], show_progress=False)
    assert [r.message.split("; the most")[0] for r in caplog.records if "upscaled" in r.message] == [
        "1 of 4 images are smaller than their training size and are upscaled (1 more than 2x: they train blurred; "
        "remove them or lower --resolution)"]
    caplog.clear()
    (tmp_path / "kohya" / "10_icons").mkdir(parents=True)  # ten repeats of one icon: one image, named once
    os.replace(tmp_path / "icon.png", tmp_path / "kohya" / "10_icons" / "icon.png")
    args = T.parse_args(["--dataset", str(tmp_path / "kohya"), "--resolution", "64"])
    T.plan_data(args, T.load_table(args)[0], show_progress=False)
    assert [r.message for r in caplog.records if "upscaled" in r.message] == [
        "1 of 1 images are smaller than their training size and are upscaled (1 more than 2x: they train blurred; "
        f"remove them or lower --resolution); the most: {tmp_path / 'kohya' / '10_icons' / 'icon.png'} (16x16, 4.0x)"]


class _FakeAccelerator:
    num_processes, process_index = 1, 0


def test_captions_lists_empty_and_dropout(tmp_path):
    import datasets
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for p in paths:
        Image.new("RGB", (64, 64)).save(p)
    table = datasets.Dataset.from_dict({"image": paths, "text": [["a", "b"], [], None]})
    dropped = datasets.Dataset.from_dict({"image": paths[1:2], "text": ["a caption"]})
    args = T.parse_args(["--dataset", "x", "--resolution", "64", "--caption_dropout", "0.0"])
    plan = T.DataPlan(targets=[(64, 64)] * 3)
    ds = T.ImageCaptionDataset(table, args, plan)
    picks = {ds[(0, s)]["caption"] for s in range(20)}
    assert picks == {"a", "b"}  # one of the list, chosen per sample seed
    assert ds[(1, 0)]["caption"] == "" and ds[(2, 0)]["caption"] == ""  # trained unconditionally
    os.remove(paths[0])
    gone = ds[(0, 0)]  # a file gone since the scan: named and replaced, not a crash
    assert gone["skipped"] == [paths[0]] and "pixel_values" in gone
    args = T.parse_args(["--dataset", "x", "--proportion_empty_prompts", "1.0"])
    assert args.caption_dropout == 1.0
    assert {T.ImageCaptionDataset(dropped, args, plan)[(0, s)]["caption"] for s in range(5)} == {""}


def test_shuffle_caption_reorders_tags_each_draw_and_keeps_the_leading_ones(tmp_path):
    """kohya's --shuffle_caption/--keep_tokens: the same tags, in another order per draw (a pure function of the
    sample seed, so a resumed run draws the same), the first N in place; the text cache is off (each draw is
    another text). --keep_tokens alone would do nothing: refused."""
    import datasets
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")],
                                       "text": ["sks, 1girl, red hair,, smile , hat"]})
    args = T.parse_args(["--dataset", "x", "--resolution", "64", "--shuffle_caption", "--keep_tokens", "1"])
    ds = T.ImageCaptionDataset(table, args, T.DataPlan(targets=[(64, 64)]))
    draws = [ds[(0, seed)]["caption"] for seed in range(30)]
    assert all(d.startswith("sks, ") and sorted(d.split(", ")) == sorted(["sks", "1girl", "red hair", "smile", "hat"])
               for d in draws)
    assert len(set(draws)) > 5 and draws == [ds[(0, seed)]["caption"] for seed in range(30)]
    assert not T.caches_text(args) and T.caches_text(T.parse_args(["--dataset", "x"]))
    with pytest.raises(T.UserError, match="--keep_tokens 2: .* use it with --shuffle_caption"):
        T.validate(T.parse_args(["--dataset", str(tmp_path), "--keep_tokens", "2"]))


@pytest.mark.parametrize("extra", [[], ["--aspect_ratio_bucketing", "--cache_latents", "--random_flip",
                                        "--shuffle_caption", "--keep_tokens", "1"]])
def test_messy_folder_trains_to_the_end_and_names_skipped_files(tiny_model, tmp_path, extra):
    folder = make_messy_folder(str(tmp_path / "messy"))
    out = str(tmp_path / "out")
    proc = run_trainer("--pretrained_model_name_or_path", tiny_model, "--dataset", folder, "--output_dir", out,
                       "--resolution", "64", "--train_batch_size", "1", "--num_train_epochs", "1",
                       "--caption_column", "captions", "--dataloader_num_workers", "2", *extra)
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert "corrupt.png" in proc.stderr and "truncated.jpg" in proc.stderr
    assert "upscaled" in proc.stderr
    if extra:
        assert "aspect-ratio buckets" in proc.stderr


def test_an_undecodable_image_is_named_and_replaced_from_its_bucket(tmp_path):
    """Batches keep their size (so all processes stay in step): a file that fails to decode is replaced by
    the next row of the same bucket, and named."""
    import datasets
    folder = make_messy_folder(str(tmp_path / "messy"))
    paths = [os.path.join(folder, n) for n in ("truncated.jpg", "rgba.png", "la.png")]
    table = datasets.Dataset.from_dict({"image": paths, "text": ["half", "rgba", "la"]})
    args = T.parse_args(["--dataset", "x", "--resolution", "64"])
    ds = T.ImageCaptionDataset(table, args, T.DataPlan(targets=[(64, 64)] * 3))
    sample = ds[(0, 1)]
    assert sample["skipped"] == [paths[0]] and sample["caption"] == "rgba"
    batch = T.collate([sample, ds[(2, 5)]])
    assert batch["pixel_values"].shape[0] == 2 and batch["skipped"] == [paths[0]]
    # A bucket whose every file fails: its samples come from the next bucket (all of them, so a batch stays one
    # size), not an empty batch that would count as a step and train nothing.
    tall = T.ImageCaptionDataset(table.select([0, 0, 1, 2]), args,
                                 T.DataPlan(targets=[(64, 32), (64, 32), (64, 64), (64, 64)]))
    batch = T.collate([tall[(0, 1)], tall[(1, 2)]])
    assert batch["captions"] == ["rgba", "la"] and batch["pixel_values"].shape[-2:] == (64, 64)
    assert set(batch["skipped"]) == {paths[0]}


def test_a_bucket_of_bad_files_decodes_each_once(tmp_path, monkeypatch):
    """Each sample of a bucket whose files mostly fail walks past the bad rows to the next good one: a bad
    row is named every time, but its file decoded (and warned about) only the first time (per loader worker)."""
    import datasets
    folder = make_messy_folder(str(tmp_path / "messy"))
    bad = [os.path.join(folder, n) for n in ("corrupt.png", "truncated.jpg")] * 3
    paths = bad + [os.path.join(folder, "rgba.png")]
    table = datasets.Dataset.from_dict({"image": paths, "text": [str(i) for i in range(len(paths))]})
    ds = T.ImageCaptionDataset(table, T.parse_args(["--dataset", "x", "--resolution", "64"]),
                               T.DataPlan(targets=[(64, 64)] * len(paths)))
    decoded, real = [], T.decode_image
    monkeypatch.setattr(T, "decode_image", lambda value, **kw: decoded.append(value) or real(value, **kw))
    samples = [ds[(i, i)] for i in range(len(bad))]
    assert all(s["caption"] == "6" for s in samples)
    assert [len(s["skipped"]) for s in samples] == [6, 5, 4, 3, 2, 1]
    # Each bad file once, though three rows name it (kohya's repeats), and the good one for every sample.
    assert len(decoded) == len(set(bad)) + len(samples)
    # Stored bytes are their row's own even when rows share a path (a Hub parquet keeps the base name only).
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    table = datasets.Dataset.from_dict({"image": [{"bytes": b"broken", "path": "1.png"},
                                                  {"bytes": png.getvalue(), "path": "1.png"}], "text": ["cat", "dog"]})
    ds = T.ImageCaptionDataset(table, T.parse_args(["--dataset", "x", "--resolution", "64"]),
                               T.DataPlan(targets=[(64, 64)] * 2))
    assert ds[(0, 0)]["caption"] == "dog" and ds[(1, 0)]["caption"] == "dog"


def test_every_image_unreadable_is_a_clear_error(tiny_model, tmp_path):
    """Files that are not images fail the header scan; truncated JPEGs pass it and fail only when decoded: the
    error comes before a step counts, and before --overwrite_output_dir removes the previous run's results."""
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    previous = ["pytorch_lora_weights.safetensors", "README.md", "metrics.jsonl", "checkpoint-3/trainer_state.json"]
    for name in previous:
        os.makedirs(os.path.dirname(tmp_path / "out" / name), exist_ok=True)
        (tmp_path / "out" / name).write_text("{}")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    for kind, content, extra, message in (("garbage", b"garbage", [], "none of the 3 images could be read"),
                                          ("truncated", truncated, ["--aspect_ratio_bucketing"],
                                           "every image failed to load"),
                                          ("truncated", truncated, ["--cache_latents"], "every image failed to load")):
        folder = str(tmp_path / kind)
        for i in range(3):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                f.write(content)
            with open(os.path.join(folder, f"{i}.txt"), "w") as f:
                f.write("a caption")
        proc = run_trainer("--pretrained_model_name_or_path", tiny_model, "--train_data_dir", folder,
                           "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--checkpointing_steps",
                           "1", "--overwrite_output_dir", *extra, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: " + message)
        assert "0.jpg" in proc.stderr.strip().splitlines()[-1]
        # No step was counted (no checkpoint that a rerun with mended images would resume as "finished"), and
        # the previous run's results are all still there.
        assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")) == ["checkpoint-3"]
        assert all((tmp_path / "out" / name).read_text() == "{}" for name in previous), kind


def test_a_broken_first_image_is_named_once_and_counted_at_the_end(tiny_model, tmp_path):
    """The start draws one sample (to stop before removing anything if no image decodes): when that sample's file
    is broken, it is said once and counted in the closing summary, as any other."""
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    for i in range(4):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{i}.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2] if i == 0 else
                                                    buf.getvalue())
        (tmp_path / "data" / f"{i}.txt").write_text("a caption")
    proc = run_trainer("--pretrained_model_name_or_path", tiny_model, "--train_data_dir", str(tmp_path / "data"),
                       "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "2",
                       "--dataloader_num_workers", "0")
    broken = str(tmp_path / "data" / "0.jpg")
    assert proc.stderr.count("skipping unreadable image " + broken) == 1, proc.stderr[-3000:]
    assert any(line.endswith("unreadable image(s) in all: " + broken) for line in proc.stderr.splitlines()), \
        proc.stderr[-3000:]


def test_cache_gives_the_same_loss_and_is_reused(tiny_model, shapes, tmp_path):
    common = ["--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--resolution", "64",
              "--train_batch_size", "2", "--max_train_steps", "3", "--logging_steps", "1", "--center_crop",
              "--random_flip", "--seed", "5", "--data_cache_dir", str(tmp_path / "cache"),
              "--cache_dir", str(tmp_path / "hub-cache")]
    plain = str(tmp_path / "plain")
    run_trainer(*common, "--output_dir", plain, "--no_text_cache")
    cached = str(tmp_path / "cached")
    first = run_trainer(*common, "--output_dir", cached, "--cache_latents")
    assert "24 new latent entries" not in first.stderr and "48 new latent entries" in first.stderr
    # --cache_dir is diffusers' Hub/datasets download cache; ours goes to --data_cache_dir, not the output folder
    assert os.listdir(tmp_path / "hub-cache") and not os.path.exists(os.path.join(cached, "cache"))
    rows = lambda d: [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    for a, b in zip(rows(plain), rows(cached)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["mse"] == pytest.approx(b["mse"], rel=1e-4)
    again = run_trainer(*common, "--output_dir", str(tmp_path / "again"), "--cache_latents")
    assert "0 new text entries, 0 new latent entries" in again.stderr
    # a changed setting rebuilds only what it changes: bucketing changes every target size, not the captions
    changed = run_trainer(*common, "--output_dir", str(tmp_path / "changed"), "--cache_latents",
                          "--aspect_ratio_bucketing")
    assert "0 new text entries" in changed.stderr and "0 new latent entries" not in changed.stderr


def test_a_latent_cache_build_cut_short_resumes_with_the_batches_it_would_have_had(shapes, tmp_path, monkeypatch):
    """A VAE batch of another size rounds differently, so a build killed part way (here: its last shard lost) must
    encode the batches an uninterrupted build would have, on every rank, not the leftovers dealt out anew."""
    import types

    args = T.parse_args(["--dataset", shapes, "--resolution", "64", "--cache_latents", "--random_flip",
                         "--cache_batch_size", "3", "--dataloader_num_workers", "0"])
    table, plan, _ = T.plan_data(args, T.load_table(args)[0], show_progress=False)
    plan.latent_ns = "ns"
    monkeypatch.setattr(T, "encode_latents", lambda vae, pixels, dtype: torch.zeros(len(pixels), 4, 8, 8))
    m = types.SimpleNamespace(vae=None, weight_dtype=torch.float32)
    ranks = [types.SimpleNamespace(process_index=rank, num_processes=2, is_local_main_process=True,
                                   device=torch.device("cpu"), reduce=lambda t, op: t) for rank in (0, 1)]
    folder = tmp_path / "cache"  # (one folder for both processes, as in a run)
    for rank in ranks:
        T.build_latent_cache(args, m, table, plan, T.TensorCache(str(folder), "latents"), rank)
    lost = {}
    for rank in (0, 1):  # each process's last shard (shards are named latents-r<rank>-<pid>-<time>)
        shards = sorted(folder.glob(f"latents-r{rank}-*.safetensors"))
        assert len(shards) > 2
        with safe_open(str(shards[-1]), "pt") as f:
            lost[rank] = sorted(f.keys())
        os.remove(shards[-1])
    before = set(folder.iterdir())
    for rank in ranks:
        n = T.build_latent_cache(args, m, table, plan, T.TensorCache(str(folder), "latents"), rank)
        again = sorted(set(folder.glob(f"latents-r{rank.process_index}-*.safetensors")) - before)
        with safe_open(str(again[0]), "pt") as f:
            assert len(again) == 1 and sorted(f.keys()) == lost[rank.process_index] and \
                n == len(lost[rank.process_index]) // 2


def test_loader_workers_default_to_spare_cpus_and_none_for_cached_latents(monkeypatch):
    import types
    one, four = types.SimpleNamespace(num_processes=1), types.SimpleNamespace(num_processes=4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    auto = T.parse_args(["--dataset", "x"])
    assert T.loader_workers(auto, one) == 8  # capped: 8 decoders keep up with an H100's batch of 1024² images
    assert T.loader_workers(auto, four) == 7  # 32 CPUs shared by 4 processes, one left for each
    assert T.loader_workers(auto, one, decoding=False) == 0  # cached latents: nothing to decode
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert T.loader_workers(auto, one) == 0  # one CPU: decode in the training process
    assert T.loader_workers(T.parse_args(["--dataset", "x", "--dataloader_num_workers", "3"]), one) == 3


def dataset_in_every_local_form(shapes, root):
    """The shapes fixture as users have datasets on disk: a Hub snapshot (hf download --local-dir:
    parquet under data/), a save_to_disk folder, one parquet file, and a JSONL file with relative image paths."""
    import shutil
    import datasets

    folder = os.path.join(shapes, "train")
    rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"))]
    table = datasets.Dataset.from_dict({"image": [os.path.join(folder, r["file_name"]) for r in rows],
                                        "text": [r["text"] for r in rows]}).cast_column("image", datasets.Image())
    os.makedirs(os.path.join(root, "snapshot", "data"))
    table.to_parquet(os.path.join(root, "snapshot", "data", "train-00000-of-00001.parquet"))
    Image.new("RGB", (8, 8)).save(os.path.join(root, "snapshot", "preview.png"))  # a dataset card's picture
    table.save_to_disk(os.path.join(root, "saved"))
    table.to_parquet(os.path.join(root, "one.parquet"))
    os.makedirs(os.path.join(root, "raw"))  # image bytes in a plain binary column, as some Hub datasets have them
    raw = datasets.Dataset.from_dict({"jpg": [open(os.path.join(folder, r["file_name"]), "rb").read() for r in rows],
                                      "txt": [r["text"] for r in rows]})
    raw.to_parquet(os.path.join(root, "raw", "train.parquet"))
    shutil.copytree(folder, os.path.join(root, "jsonl", "pictures"))
    with open(os.path.join(root, "jsonl", "train.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({"file": "pictures/" + r["file_name"], "caption": r["text"]}) + "\n")
    shutil.copytree(os.path.join(root, "jsonl"), os.path.join(root, "nested", "data"))  # paths relative to data/
    os.remove(os.path.join(root, "nested", "data", "pictures", "metadata.jsonl"))  # train.jsonl is the data
    return rows, {"snapshot": [os.path.join(root, "snapshot")], "saved": [os.path.join(root, "saved")],
                  "parquet": [os.path.join(root, "one.parquet")],
                  "raw_bytes": [os.path.join(root, "raw")],  # webdataset's column names are found by themselves
                  "jsonl": [os.path.join(root, "jsonl", "train.jsonl"), "--image_column", "file"],
                  "jsonl_in_a_subfolder": [os.path.join(root, "nested"), "--image_column", "file"]}


def test_every_local_dataset_form_loads_with_its_captions(shapes, tmp_path):
    rows, forms = dataset_in_every_local_form(shapes, str(tmp_path))
    for name, (source, *extra) in forms.items():
        table, _ = T.load_table(T.parse_args(["--dataset", source, *extra]))
        assert sorted(table["text"]) == sorted(r["text"] for r in rows), name
        assert T.decode_image(table[0]["image"])[1][0] >= 96, name  # images resolve (relative paths too)


def test_split_folders_and_split_named_files_hold_out_only_what_their_names_say(tmp_path, caplog):
    """Images beside a test/ folder train (test/ is held out; they were dropped for it, a 1-image run); a metadata
    file above train/ is read; images beside train/ are named as unused; a data file whose name says no split
    trains beside a `_val` one (datasets kept only the validation file); image + caption files follow the same
    split folders (their test/ images trained)."""
    def image(path, text, metadata=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(path)
        if metadata:
            with open(metadata, "a") as f:
                f.write(json.dumps({"file_name": os.path.relpath(path, metadata.parent), "text": text}) + "\n")
        else:
            path.with_suffix(".txt").write_text(text)

    texts = lambda folder: sorted(T.load_table(T.parse_args(["--dataset", str(folder)]))[0]["text"])
    root = tmp_path / "beside_test"
    for i in range(3):
        image(root / f"{i}.png", f"root {i}", root / "metadata.jsonl")
    image(root / "test" / "t.png", "held out", root / "test" / "metadata.jsonl")
    assert texts(root) == ["root 0", "root 1", "root 2"] and "test is left out" in caplog.text
    above = tmp_path / "above"
    image(above / "train" / "a.png", "from the metadata above", above / "metadata.jsonl")
    assert texts(above) == ["from the metadata above"]
    image(above / "train" / "b.png", "b")  # (its own caption file, not read: the metadata above names no b.png)
    assert texts(above) == ["from the metadata above"] and "b.png" in caplog.text
    beside = tmp_path / "beside_train"
    image(beside / "train" / "a.png", "a", beside / "train" / "metadata.jsonl")
    image(beside / "stray.png", "stray", beside / "metadata.jsonl")
    assert texts(beside) == ["a"] and "1 images of dataset" in caplog.text
    files = tmp_path / "files"
    for name, rows in (("captions.jsonl", 2), ("captions_val.jsonl", 1)):
        for i in range(rows):
            image(files / f"{name}{i}.png", name, files / name)
    assert texts(files) == ["captions.jsonl"] * 2 and "captions_val.jsonl held out" in caplog.text
    hub = tmp_path / "hub"  # a Hub download: its train file trains; dataset_infos.json is no data file
    for split in ("train", "test"):
        image(hub / "data" / f"{split}.png", split, hub / "data" / f"{split}-00000-of-00001.jsonl")
    (hub / "dataset_infos.json").write_text("{}")
    (hub / "config.json").write_text("{}")
    (hub / "notes.csv").write_text("a,b\n1,2\n")  # another format than the data files'
    assert texts(hub) == ["train"]
    mixed = tmp_path / "mixed"  # a val file of another format than the unsplit one: datasets trained on val alone
    image(mixed / "a.png", "a", mixed / "captions_val.jsonl")
    (mixed / "captions.csv").write_text("image,text\na.png,a\n")
    with pytest.raises(T.UserError, match="'captions.csv' says no split and 'captions_val.jsonl' a held-out one"):
        texts(mixed)
    sidecars = tmp_path / "sidecars"
    image(sidecars / "train" / "a.png", "train")
    image(sidecars / "test" / "b.png", "test")
    assert texts(sidecars) == ["train"] and "not images this trainer reads" not in caplog.text
    both = tmp_path / "one_metadata_for_both"  # datasets yields every row of it: the test/ rows are dropped
    image(both / "train" / "a.png", "train a", both / "metadata.jsonl")
    image(both / "test" / "b.png", "test b", both / "metadata.jsonl")
    assert texts(both) == ["train a"] and "1 rows of the metadata of" in caplog.text
    image(root / "test" / "u.png", "also held out", root / "metadata.jsonl")  # named in the root's metadata
    assert texts(root) == ["root 0", "root 1", "root 2"]
    # A lone split folder with an uncaptioned stray beside it (a cover, a preview) still trains, as before.
    image(tmp_path / "lone" / "validation" / "v.png", "v", tmp_path / "lone" / "validation" / "metadata.jsonl")
    Image.new("RGB", (32, 32)).save(tmp_path / "lone" / "preview.png")
    assert texts(tmp_path / "lone") == ["v"]
    image(tmp_path / "lone_txt" / "val" / "v.png", "v")
    Image.new("RGB", (32, 32)).save(tmp_path / "lone_txt" / "cover.png")
    assert texts(tmp_path / "lone_txt") == ["v"]
    image(tmp_path / "lone" / "cover.png", "a cover")  # a caption file is not read beside metadata: still val/
    assert texts(tmp_path / "lone") == ["v"]
    image(tmp_path / "lone_above" / "validation" / "v.png", "v", tmp_path / "lone_above" / "metadata.jsonl")
    assert texts(tmp_path / "lone_above") == ["v"]  # the metadata above a lone split folder, no loose images
    spaced = tmp_path / "spaced"  # a spreadsheet cell "a.png " beside a held-out test/: trains, as without test/
    image(spaced / "train" / "a.png", "a")
    (spaced / "train" / "a.txt").unlink()
    (spaced / "train" / "metadata.csv").write_text("file_name,text\na.png ,a\n")
    image(spaced / "test" / "t.png", "t", spaced / "test" / "metadata.jsonl")
    assert texts(spaced) == ["a"]


def test_split_names_in_file_names_brackets_in_paths_and_dataset_configs(tmp_path):
    """datasets reads split names anywhere in a name: given the folder alone, `dog_test_04.png` went to a test
    split and the run trained on the rest. Only folders named exactly as splits are splits (train/ trains, as
    data/train/ does). A path with [ ] in it is no pattern. --dataset_config_name picks one of a downloaded dataset's README configs."""
    import datasets

    root = tmp_path / "photos [v2]"
    names = ["a.png", "dog_test_04.png", "train_station.png", "val 1.png", "dev-kit/c.png"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names))
    table, _ = T.load_table(T.parse_args(["--dataset", str(root)]))
    assert sorted(table["text"]) == sorted(names)
    for split in ("train", "test"):  # datasets' documented layout: the train/ folder trains, at any depth
        for folder in (tmp_path / "splits" / split, tmp_path / "hub" / "data" / split):
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(folder / "x.png")
            (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": split}))
    assert T.load_table(T.parse_args(["--dataset", str(tmp_path / "splits")]))[0]["text"] == ["train"]
    assert T.load_table(T.parse_args(["--dataset", str(tmp_path / "hub")]))[0]["text"] == ["train"]
    shutil.rmtree(tmp_path / "hub")
    # Names are matched as datasets matches them, case-sensitively: a category folder Test/ is no split, and a
    # folder of other files named eval/ is none either.
    (root / "Test").mkdir()
    Image.new("RGB", (32, 32)).save(root / "Test" / "t.png")
    (root / "eval").mkdir()
    (root / "eval" / "prompts.txt").write_text("a prompt")
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "Test/t.png", "text": "Test/t.png"}) + "\n")
    table, _ = T.load_table(T.parse_args(["--dataset", str(root)]))
    assert sorted(table["text"]) == sorted(names + ["Test/t.png"])
    shutil.rmtree(tmp_path / "splits" / "train")
    assert T.load_table(T.parse_args(["--dataset", str(tmp_path / "splits")]))[0]["text"] == ["test"]  # the only one
    shutil.copytree(tmp_path / "splits" / "test", tmp_path / "splits" / "val")
    with pytest.raises(T.UserError, match="has no train/ folder .*split folders: test, val"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path / "splits")]))
    hub = tmp_path / "hub"  # `hf download` of a dataset with two configurations
    (hub / "data").mkdir(parents=True)
    for config in ("small", "large"):
        datasets.Dataset.from_dict({"image": [str(root / "a.png")], "text": [config]}).to_parquet(
            str(hub / "data" / f"{config}.parquet"))
    (hub / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files: data/{c}.parquet\n" for c in ("small", "large")) + "---\n")
    table, _ = T.load_table(T.parse_args(["--dataset", str(hub), "--dataset_config_name", "large"]))
    assert table["text"] == ["large"]
    datasets.Dataset.from_dict({"image": [str(root / "a.png")], "text": ["one"]}).to_parquet(str(root / "one.parquet"))
    assert T.load_table(T.parse_args(["--dataset", str(root / "one.parquet")]))[0]["text"] == ["one"]
    shutil.copytree(hub, root / "hub")
    with pytest.raises(T.UserError, match=r"has \[ \] or \* in it: rename the folder"):
        T.load_table(T.parse_args(["--dataset", str(root / "hub"), "--dataset_config_name", "large"]))


def test_kohya_folder_captions_txt_caption_bom_subfolders_and_output_dir_excluded(tmp_path, caplog):
    folder = tmp_path / "kohya"
    (folder / "sub").mkdir(parents=True)
    for name, sub in (("a", ""), ("b", "sub"), ("c", ""), ("d", "")):
        Image.new("RGB", (32, 32), "red").save(folder / sub / f"{name}.png")
    (folder / "a.txt").write_text("\ufeffa red square", encoding="utf-8")  # a Windows editor's byte-order mark
    (folder / "sub" / "b.caption").write_text("a caption file", encoding="utf-8")
    (folder / "c.txt").write_text("", encoding="utf-8")
    os.symlink(folder / "sub", folder / "loop")  # a symlinked folder is followed once
    out = folder / "my-lora" / "samples"  # an output folder inside the dataset: its images are not data
    out.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(out / "step_000010.png")
    (folder / "lora-v1").mkdir()  # an earlier run's output folder, also inside: its loss plot is not data
    Image.new("RGB", (110, 40)).save(folder / "lora-v1" / "loss.png")
    (folder / "lora-v1" / "train_config.json").write_text("{}")
    table, _ = T.load_table(T.parse_args(["--dataset", str(folder), "--output_dir", str(folder / "my-lora")]))
    found = dict(zip((os.path.relpath(p, folder) for p in table["image"]), table["text"]))
    assert sorted(found.values()) == ["", "", "a caption file", "a red square"]  # BOM gone, my-lora/ left out
    assert sum(p.endswith("b.png") for p in found) == 1  # the symlinked subfolder once, not twice
    assert "2 of" in caplog.text and "empty prompt" in caplog.text
    assert "lora-v1: an output folder of this trainer" in caplog.text
    for sub in ("cat", "cat/close-ups", "cat-2", "cat 3"):  # the order of earlier versions (resumes stay exact)
        (tmp_path / "order" / sub).mkdir(parents=True)
        (tmp_path / "order" / sub / "a.png").touch()
    assert [os.path.relpath(p, tmp_path / "order") for p in T.list_files(str(tmp_path / "order"))] == [
        "cat/a.png", "cat 3/a.png", "cat-2/a.png", "cat/close-ups/a.png"]
    only_links = tmp_path / "links"  # kohya's "10_subject" folders are often symlinks to the real ones
    only_links.mkdir()
    os.symlink(folder / "sub", only_links / "10_shapes")
    table, _ = T.load_table(T.parse_args(["--dataset", str(only_links)]))
    assert table["text"] == ["a caption file"] * 10  # a kohya DreamBooth folder: 10 repeats


def test_copies_in_other_formats_and_undecodable_names_are_summed_up(tmp_path, caplog):
    """a.png kept beside its conversion a.webp, one a.txt: both train (as kohya does), named once. Names that are
    not UTF-8 (an unzipped Windows archive: thousands of them) are one line, not one per file."""
    for name in ("a.png", "a.webp", "b.png"):
        Image.new("RGB", (32, 32), "red").save(tmp_path / name)
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"{name} caption")
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))  # a folder's name too: its files cannot be stored
    for i, where in ((0, b""), (1, b""), (2, b"caf\xe9")):
        Image.new("RGB", (32, 32)).save(os.path.join(os.fsencode(tmp_path), where, b"caf\xe9%d.png" % i))
        open(os.path.join(os.fsencode(tmp_path), where, b"caf\xe9%d.txt" % i), "w").write("latin-1 name")
    Image.new("RGB", (32, 32)).save(os.path.join(os.fsencode(tmp_path), b"caf\xe9", b"plain.png"))
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    assert sorted(table["text"]) == ["a caption", "a caption", "b caption"]
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert "1 caption files each caption several images of one name (e.g. a.txt for a.png, a.webp)" in warnings[-1]
    assert len([w for w in warnings if "UTF-8" in w]) == 1 and "skipping 7 file(s) whose names are not valid" in \
        warnings[0]


def test_caption_extension_picks_one_kind_and_differing_caption_files_are_named(tmp_path, caplog):
    """A folder captioned twice (tags in .txt, sentences in .caption, as kohya's taggers and BLIP write them):
    .txt is read, the difference is named, and kohya's --caption_extension picks the other. IMG.JPG.txt (some
    taggers' naming) is an image's caption too. A data flag that has no effect on the data says so."""
    folder = tmp_path / "twice"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (32, 32), "red").save(folder / f"{name}.png")
    for name, tags, sentence in (("a", "red, square", "a red square"), ("b", "same", "same")):
        (folder / f"{name}.txt").write_text(tags, encoding="utf-8")
        (folder / f"{name}.caption").write_text(sentence, encoding="utf-8")
    (folder / "c.png.txt").write_text("c tags", encoding="utf-8")
    (folder / "c.caption").write_text("a c sentence", encoding="utf-8")  # .txt first, whichever way it is named

    def read(*flags):
        table, _ = T.load_table(T.parse_args(["--dataset", str(folder), *flags]))
        return {os.path.basename(T.describe_image(v)): text for v, text in zip(table["image"], table["text"])}

    assert read() == {"a.png": "red, square", "b.png": "same", "c.png": "c tags"}
    assert "2 images have caption files that differ" in caplog.text and "a.txt and" in caplog.text
    # d.png and d.jpg, each with its own full-name caption beside a d.txt: each reads its own, not the shared one.
    Image.new("RGB", (32, 32), "red").save(folder / "d.png")
    Image.new("RGB", (32, 32), "red").save(folder / "d.jpg")
    for name, text in (("d.png.txt", "d png"), ("d.jpg.txt", "d jpg"), ("d.txt", "d shared")):
        (folder / name).write_text(text, encoding="utf-8")
    assert {k: v for k, v in read().items() if k.startswith("d.")} == {"d.png": "d png", "d.jpg": "d jpg"}
    os.remove(folder / "d.png")  # one d image: d.txt, as kohya reads it, before d.jpg.txt
    assert read()["d.jpg"] == "d shared"
    os.remove(folder / "d.txt")  # and d.jpg.txt before a .caption
    (folder / "d.caption").write_text("d sentence", encoding="utf-8")
    assert read()["d.jpg"] == "d jpg"
    for name in ("d.jpg", "d.png.txt", "d.jpg.txt", "d.caption"):
        os.remove(folder / name)
    caplog.clear()
    assert "captioned files" not in caplog.text  # c.png.txt is c.png's caption, not a file left out
    caplog.clear()
    assert read("--caption_extension", "caption") == {"a.png": "a red square", "b.png": "same", "c.png": "a c sentence"}
    assert "differ" not in caplog.text
    with pytest.raises(T.UserError, match=r"no captions: put a same-name \.tags file"):
        read("--caption_extension", ".tags")
    caplog.clear()
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "text": n}) + "\n"
                                                   for n in "abc"))
    assert read("--caption_extension", ".txt", "--dataset_config_name", "x") == {"a.png": "a", "b.png": "b",
                                                                                  "c.png": "c"}
    assert "--caption_extension '.txt' is not used: the data is an imagefolder" in caplog.text
    assert "--dataset_config_name 'x' is not used" in caplog.text


def test_kohya_dreambooth_folders_repeat_and_caption_by_folder_name(tmp_path, caplog):
    """kohya's "<repeats>_<words>" folders: images without a caption file are captioned with the words, every
    image counts `repeats` times (as kohya trains them); caption files match whatever the extensions' case; a
    captioned file of a format we can't read (an iPhone's .HEIC) is named, not dropped silently."""
    caplog.set_level("INFO", logger="train_sdxl_debias")
    data = tmp_path / "train"
    for sub in ("10_sks dog", "1_dog"):
        (data / sub).mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), "red").save(data / "10_sks dog" / f"{i}.jpg")
        Image.new("RGB", (32, 32), "blue").save(data / "1_dog" / f"IMG_{i}.JPG")
        (data / "1_dog" / f"IMG_{i}.TXT").write_text(f"a dog, photo {i}")
    (data / "10_sks dog" / "0.txt").write_text("sks dog on a beach")  # a caption file wins over the folder's words
    (data / "1_dog" / "IMG_7.HEIC").write_bytes(b"not readable here")
    (data / "1_dog" / "IMG_7.txt").write_text("a dog from an iPhone")
    table, _ = T.load_table(T.parse_args(["--train_data_dir", str(data)]))
    count = {}
    for path, text in zip(table["image"], table["text"]):
        count[os.path.relpath(path, data), text] = count.get((os.path.relpath(path, data), text), 0) + 1
    assert count == {("10_sks dog/0.jpg", "sks dog on a beach"): 10, ("10_sks dog/1.jpg", "sks dog"): 10,
                     ("1_dog/IMG_0.JPG", "a dog, photo 0"): 1, ("1_dog/IMG_1.JPG", "a dog, photo 1"): 1}
    assert "'10_sks dog' x10 (1 image(s) without a caption file captioned 'sks dog'); '1_dog' x1" in caplog.text
    assert "not images this trainer reads (.HEIC)" in caplog.text
    # A warning, not an info line: numbered folders of another origin (12_street/) would train 12x as often.
    assert {r.levelname for r in caplog.records if "kohya DreamBooth folders" in r.getMessage()} == {"WARNING"}
    plan_table, plan, _ = T.plan_data(T.parse_args(["--train_data_dir", str(data), "--resolution", "32"]), table,
                                      show_progress=False)
    assert len(plan_table) == 22 and len(set(plan.idents)) == 4  # repeats share an identity: one cache entry
    for seed in range(3):  # --max_train_samples draws images, each with all its repeats
        few, _ = T.load_table(T.parse_args(["--train_data_dir", str(data), "--max_train_samples", "2", "--seed",
                                            str(seed)]))
        repeats = {p: 10 if "10_sks dog" in p else 1 for p in set(few["image"])}
        assert len(repeats) == 2 and all(list(few["image"]).count(p) == n for p, n in repeats.items()), seed
    assert plan.describe() == "4 images (22 samples an epoch)"  # as the log and the model card count them
    Image.new("RGB", (32, 32)).save(data / "preview.png")  # an uncaptioned picture beside the folders: left out
    table, _ = T.load_table(T.parse_args(["--train_data_dir", str(data)]))
    assert len(table) == 22 and "1 uncaptioned image(s) beside kohya's DreamBooth folders are left out" in caplog.text
    os.remove(data / "preview.png")
    Image.new("RGB", (32, 32)).save(data / "loose.png")  # a captioned image beside the folders: not kohya's layout
    (data / "loose.txt").write_text("loose")
    table, _ = T.load_table(T.parse_args(["--train_data_dir", str(data)]))
    assert len(table) == 5 and table["text"].count("") == 1  # no repeats, no folder captions
    assert "'loose.png' beside them has a caption file" in caplog.text  # and says why
    os.remove(data / "loose.png")
    (data / "10_sks dog" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    table, _ = T.load_table(T.parse_args(["--train_data_dir", str(data)]))
    plan_table, _, _ = T.plan_data(T.parse_args(["--train_data_dir", str(data), "--resolution", "32"]), table,
                                   show_progress=False)
    assert len(table) == 32 and len(plan_table) == 22 and "skipping 1 unreadable image(s)" in caplog.text


def test_folders_that_look_like_kohyas_but_are_not_read_so_say_why(tmp_path, caplog):
    """Near misses of kohya's layout: a folder not named <repeats>_<words> beside them, 0 repeats, or
    kohya's img/ folder's parent passed as the data. An empty caption file in a DreamBooth folder takes the
    folder's words (kohya's folders are mostly uncaptioned)."""
    def layout(name, folders):
        for sub, caption in folders:
            (tmp_path / name / sub).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / name / sub / "a.png")
            if caption is not None:
                (tmp_path / name / sub / "a.txt").write_text(caption)
        return str(tmp_path / name)

    load = lambda folder: T.load_table(T.parse_args(["--dataset", folder]))[0]
    table = load(layout("other", [("10_dog", None), ("misc", "a cat")]))
    assert sorted(table["text"]) == ["", "a cat"] and "'misc' beside them is not named <repeats>_<words>" in caplog.text
    for name, folders, why in (("zero", [("0_reg", None), ("5_dog", None)], "'0_reg' repeats its images 0 times"),
                               ("parent", [("img/10_dog", None)], "pass its parent folder")):
        with pytest.raises(T.UserError, match=f"images but no captions: .*{why}"):
            load(layout(name, folders))
    assert load(layout("empty", [("10_sks dog", "")]))["text"] == ["sks dog"] * 10
    layout("itself", [("10_cat", None)])  # the DreamBooth folder given, not its parent
    with pytest.raises(T.UserError, match="its name is one of kohya's DreamBooth folders.*pass its parent folder "
                                          f"'{tmp_path / 'itself'}'"):
        load(str(tmp_path / "itself" / "10_cat"))
    caplog.clear()  # a year is no number of repeats: 2023_trip/ is an ordinary folder, said nothing about
    assert load(layout("year", [("2023_trip", "a beach")]))["text"] == ["a beach"] and "kohya" not in caplog.text
    # ... but kohya would read 1500_sks/ as 1500 repeats of "sks": said, where an image is left without a caption.
    assert sorted(load(layout("long", [("1500_sks", None), ("2024_trip", "a beach")]))["text"]) == ["", "a beach"]
    assert "folders '1500_sks' are read as plain folders" in caplog.text and "1 to 999 repeats" in caplog.text


def test_a_caption_file_named_exactly_as_its_image_wins_and_accents_match_in_either_form(tmp_path, caplog):
    """cat.png and Cat.png each with its own caption (a case-sensitive file system) do not share one, and a
    caption file whose accented name a Mac stored decomposed (NFD) still captions its image (NFC)."""
    for name, caption in (("cat", "red lowercase cat"), ("Cat", "blue capital Cat")):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    Image.new("RGB", (32, 32)).save(tmp_path / (unicodedata.normalize("NFC", "café") + ".png"))
    (tmp_path / (unicodedata.normalize("NFD", "café") + ".txt")).write_text("a coffee")
    if len(os.listdir(tmp_path)) < 6:
        pytest.skip("this file system folds case or Unicode forms in names")
    table = T.load_table(T.parse_args(["--dataset", str(tmp_path)]))[0]
    captions = {os.path.basename(unicodedata.normalize("NFC", p)): t for p, t in zip(table["image"], table["text"])}
    assert captions == {"cat.png": "red lowercase cat", "Cat.png": "blue capital Cat", "café.png": "a coffee"}
    assert "differ" not in caplog.text and "caption several images" not in caplog.text


def test_caption_files_beside_a_metadata_file_and_pipes_among_images_are_named(tmp_path, caplog):
    """With a metadata file the captions come from its column: .txt files beside the images are not read, and
    that is said. A named pipe ending in .png would block the scan forever: it is skipped, with a word."""
    for name in ("a", "b"):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"{name} from its caption file")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a from metadata"}\n'
                                             '{"file_name": "b.png", "text": "b from metadata"}\n')
    os.mkfifo(tmp_path / "pipe.png")
    table = T.load_table(T.parse_args(["--dataset", str(tmp_path)]))[0]
    assert sorted(table["text"]) == ["a from metadata", "b from metadata"]
    assert "2 images have caption files (e.g. " in caplog.text and "that are not read" in caplog.text
    assert "skipping 1 entries that are not files (pipes, sockets, devices; e.g. " in caplog.text


def test_the_data_fingerprint_follows_images_and_captions_not_where_they_are(tmp_path):
    """What a resume compares to say the dataset changed: file names, sizes and captions in order, so a copy of
    the folder elsewhere (new paths and times) is the same data, and an edited caption is not."""
    def fingerprint(folder):
        table, plan, _ = T.plan_data(T.parse_args(["--dataset", "x", "--resolution", "32"]), T.load_table(
            T.parse_args(["--train_data_dir", str(folder)]))[0], show_progress=False)
        return plan.fingerprint(table["text"])

    (tmp_path / "a").mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), color).save(tmp_path / "a" / f"{i}.png")
        (tmp_path / "a" / f"{i}.txt").write_text(f"a {color} square")
    first = fingerprint(tmp_path / "a")
    assert first.startswith("2 images, ")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # a node-local copy: other paths, other times
    os.utime(tmp_path / "b" / "0.png", (1, 1))
    assert fingerprint(tmp_path / "b") == first
    (tmp_path / "b" / "0.txt").write_text("a red circle")
    assert fingerprint(tmp_path / "b") != first


def test_images_without_any_caption_are_a_clear_error(tmp_path):
    for i in range(3):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i}.png")
    with pytest.raises(T.UserError, match="3 images but no captions") as e:
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    assert "pass it as --dataset" not in str(e.value)
    (tmp_path / "captions.json").write_text('[{"file": "0.png", "caption": "a square"}]')  # beside images: no data
    with pytest.raises(T.UserError, match="if '.*captions.json' holds the captions, pass it as --dataset"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))


def test_images_the_metadata_does_not_name_are_counted(tmp_path, caplog):
    for i in range(4):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i}.png")
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i in range(3):  # 3.png is left out, which datasets does without a word
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) + "\n")
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "out")]))
    assert len(table) == 3 and "1 of 4 images in" in caplog.text and "not named in its metadata" in caplog.text
    assert "are not used: 3.png" in caplog.text
    caplog.clear()
    # Rows for a missing file and a repeated one no longer hide an unnamed image; a name in another case is
    # hinted at; a name with its accents composed otherwise than on disk (a copy from macOS) finds its file.
    named = ["0.png", "0.png", "gone.png", "1.PNG", unicodedata.normalize("NFC", "café.png")]
    Image.new("RGB", (32, 32)).save(tmp_path / unicodedata.normalize("NFD", "café.png"))
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in named))
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "out")]))
    assert "3 of 5 images in" in caplog.text and "are not used (the metadata names '1.PNG', the file is '1.png': " \
        "file_name must match in case): 1.png, 2.png, 3.png" in caplog.text
    assert "1 images are named by more than one metadata row, each row a sample of its own: 0.png x2" in caplog.text
    assert T.read_size(table[4]["image"]) == (32, 32)
    for name in ("metadata.jsonl", unicodedata.normalize("NFD", "café.png")):
        os.remove(tmp_path / name)
    caplog.clear()
    val = tmp_path / "only-val" / "val"  # one split, named val/: datasets calls it 'validation'
    val.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(val / "0.png")
    (val / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a val image"}) + "\n")
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path / "only-val")]))
    assert table["text"] == ["a val image"] and "not used" not in caplog.text


def test_captions_missing_in_metadata_are_counted_and_all_missing_is_an_error(tmp_path, caplog):
    for i in range(4):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": "0.png", "text": "a cat"}, {"file_name": "1.png", "text": None},
            {"file_name": "2.png", "text": "  "}, {"file_name": "3.png"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    assert len(table) == 4 and "3 of 4 images have no caption" in caplog.text
    rows = [{"file_name": "0.png", "text": ""}] + [{"file_name": f"{i}.png", "Text": "misspelt"} for i in (1, 2, 3)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(T.UserError, match="every caption in column 'text'"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    with pytest.raises(T.UserError, match="both 'text'"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path), "--image_column", "text"]))
    for records in ({"en": "a cat", "de": "eine Katze"}, [{"raw": "a cat"}], [["a cat"]]):  # would train on their repr
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": records})
                                                         + "\n" for i in range(4)))
        with pytest.raises(T.UserError, match="caption column 'text' .* holds records, not text .*'a cat'"):
            T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
        # In some rows only, beside text: datasets 5 reads the column as Json, and each row keeps its type.
        rows = [{"image": f"{i}.png", "text": "a dog" if i else records} for i in range(4)]
        (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(T.UserError, match="caption column 'text' .* holds records, not text .*'a cat'"):
            T.load_table(T.parse_args(["--dataset", str(tmp_path / "mixed.jsonl")]))


LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 12345\n"


def test_a_dollar_name_in_an_imagefolder_is_named_not_looked_for_elsewhere(tmp_path, monkeypatch):
    """datasets expands $NAME in an imagefolder's paths: price$HOME.png was looked for as price/<home>.png and the
    whole dataset refused with "No such file". The file is named, with the fix."""
    monkeypatch.setenv("HOME", "/root")
    for name in ("a.png", "price$HOME.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n"
                                                     for n in ("a.png", "price$HOME.png")))
    (tmp_path / "notes$HOME.txt").write_text("not read by datasets: no matter")
    with pytest.raises(T.UserError, match=r"price\$HOME.png' names an environment variable, which datasets expands "
                                          r"\(it looks for '.*price/root.png'\): rename it without '\$'"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    os.rename(tmp_path / "price$HOME.png", tmp_path / "price.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "price.png", "text": "p"}) + "\n")
    assert T.load_table(T.parse_args(["--dataset", str(tmp_path)]))[0]["text"] == ["p"]


def test_a_metadata_csv_from_a_spreadsheet_loads_or_says_what_to_fix(tmp_path, caplog):
    """Excel's plain "CSV" is Windows-1252, its CSV is semicolon-separated where the decimal mark is a comma, and
    PowerShell writes UTF-16: one line each that says how to save it. A header typed with spaces after the commas
    still finds its columns; rows without a file name are left out."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,un café crème\n".encode("cp1252"))
    with pytest.raises(T.UserError, match="not UTF-8: save it as UTF-8, in Excel as 'CSV UTF-8'"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    (tmp_path / "metadata.csv").write_text("file_name;text\na.png;un café crème\n", encoding="utf-8")
    with pytest.raises(T.UserError, match="separates its fields with semicolons: save it with commas"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    os.remove(tmp_path / "metadata.csv")
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "café"}\n'.encode("utf-16"))
    with pytest.raises(T.UserError, match="metadata.jsonl is UTF-16: save it as UTF-8"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    os.remove(tmp_path / "metadata.jsonl")
    # Spaces after the header's commas, and around a file name; the blank rows a spreadsheet leaves after
    # cleared cells.
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    blank_rows = ",\n,\n" if Version(datasets.__version__) >= Version("4.8") else ""  # older: see below
    (tmp_path / "metadata.csv").write_text("file_name, text\na.png,un café crème\n b.png ,b\n" + blank_rows,
                                           encoding="utf-8")
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    assert table["text"] == ["un café crème", "b"] and table["row"] == [0, 1]
    assert [T.read_size(v) for v in table["image"]] == [(32, 32)] * 2  # " b.png " is b.png
    os.remove(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text("file_name, text\na.png,un café crème\n,\n,\n", encoding="utf-8")
    if Version(datasets.__version__) < Version("4.8"):  # older datasets stop on a row without a file name
        with pytest.raises(T.UserError, match="has no file_name, e.g. the blank rows"):
            T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
        (tmp_path / "metadata.csv").write_text("file_name, text\na.png,un café crème\n", encoding="utf-8")
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    assert table["text"] == ["un café crème"] and table["row"] == [0]
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path), "--caption_column", "text"]))
    assert table["text"] == ["un café crème"]
    os.remove(tmp_path / "metadata.csv")
    # What datasets' parsers fail on with their own words ("list index out of range", "Expected 2 fields in line
    # 3, saw 3", "changed from string to number"): the file, the line and the fix.
    for name, text, needle in (
            ("metadata.csv", "file_name,text\n", "metadata.csv has no rows"),
            ("metadata.csv", "sep=,\nfile_name,text\na.png,x\n", "starts with Excel's 'sep=,' line: delete"),
            ("metadata.csv", "file_name,text\na.png,x\na.png,a red, round thing\n",
             "line 3 has 3 fields, the header 2: a caption with a comma in it must be in double quotes"),
            ("metadata.csv", "File_Name,text\na.png,x\n", "no file_name column (it has: File_Name, text): rename"),
            ("metadata.jsonl", "", "metadata.jsonl has no rows"),
            ("metadata.jsonl", '[{"file_name": "a.png", "text": "x"}]', "is one JSON array: write one JSON object "
                                                                          "per line"),
            ("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "te\n',
             "line 2 is not valid JSON"),
            ("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": 7}\n',
             "'text' holds text on line 1 and numbers on line 2: write numbers meant as text in quotes"),
            ("metadata.csv", LFS_POINTER, "metadata.csv is a Git LFS pointer, not the data: run `git lfs pull`"),
            ("metadata.jsonl", LFS_POINTER, "metadata.jsonl is a Git LFS pointer, not the data")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(T.UserError, match=re.escape(needle)):
            T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
        os.remove(tmp_path / name)
    # A metadata file that is a link to nothing (a folder copied without its target) is named, not a traceback.
    os.symlink(tmp_path / "gone" / "metadata.jsonl", tmp_path / "metadata.jsonl")
    with pytest.raises(T.UserError, match="metadata.jsonl is a link to .*gone.*, which does not exist: replace it"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    os.remove(tmp_path / "metadata.jsonl")
    (tmp_path / "data.jsonl").write_text(LFS_POINTER)  # a data file passed itself: the same checks
    with pytest.raises(T.UserError, match="data.jsonl is a Git LFS pointer"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path / "data.jsonl")]))
    os.remove(tmp_path / "data.jsonl")
    (tmp_path / "data.csv").write_text("image;text\na.png;x\n")  # a data file passed itself: the same checks
    with pytest.raises(T.UserError, match="separates its fields with semicolons"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path / "data.csv")]))
    (tmp_path / "DATA.CSV").write_text('image,text,source\na.png,"a, b",web\nb.png,\n \n')  # short rows: empty cells
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path / "DATA.CSV")]))
    assert list(table["text"]) == ["a, b", None]  # (b.png's missing file is named when the images are scanned)
    for name in ("data.csv", "DATA.CSV"):
        os.remove(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(  # datasets' other image columns: *_file_name
        {"img_file_name": n, "conditioning_image_file_name": n, "text": n}) + "\n" for n in ("a.png", "b.png")))
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    caplog.clear()
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path), "--image_column", "img"]))
    assert table["text"] == ["a.png", "b.png"] and "not used" not in caplog.text and "more than one" not in caplog.text
    os.remove(tmp_path / "metadata.jsonl")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,un café crème\n", encoding="utf-8")
    os.rename(tmp_path / "metadata.csv", tmp_path / "captions.csv")  # not a name datasets reads as metadata
    for name in ("b.png", "c.png"):  # mostly images: datasets reads the folder as images without captions
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    with pytest.raises(T.UserError, match="If '.*captions.csv' holds the captions: pass it as --dataset"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    datasets.Dataset.from_csv(str(tmp_path / "captions.csv")).to_parquet(str(tmp_path / "captions.parquet"))
    os.remove(tmp_path / "captions.csv")
    with pytest.raises(T.UserError, match="If '.*captions.parquet' holds the captions: pass it as --dataset"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path)]))
    assert T.load_table(T.parse_args(["--dataset", str(tmp_path / "captions.parquet")]))[0]["text"] == ["un café crème"]


def test_caption_encodings_hidden_files_and_odd_names(tmp_path, caplog):
    folder = tmp_path / "kohya"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "__MACOSX").mkdir()
    (folder / "@eaDir" / "photo.jfif").mkdir(parents=True)  # a Synology NAS's thumbnails of each photo
    (folder / "$Recycle.Bin").mkdir()  # Windows' recycle bin, in the case it has on C:
    for name in ("latin", "notepad", "photo", ".ipynb_checkpoints/photo-checkpoint", "__MACOSX/._photo", "._photo",
                 "@eaDir/photo.jfif/SYNOPHOTO_THUMB_M", "$Recycle.Bin/photo"):
        Image.new("RGB", (32, 32)).save(folder / f"{name}.png" if "photo" not in name else folder / f"{name}.jfif",
                                        format="PNG" if "photo" not in name else "JPEG")
        (folder / f"{name}.txt").write_text("a copy", encoding="utf-8")
    (folder / "latin.txt").write_bytes("un café".encode("latin-1"))
    (folder / "notepad.txt").write_bytes("a naïve ninja".encode("utf-16"))  # Notepad's "Unicode", with its mark
    (folder / "photo.txt").write_text("a .jfif photo", encoding="utf-8")
    Image.new("RGB", (32, 32)).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"))  # not UTF-8: skipped
    table, _ = T.load_table(T.parse_args(["--dataset", str(folder)]))
    found = {os.path.basename(p): t for p, t in zip(table["image"], table["text"])}
    assert found == {"latin.png": "un café", "notepad.png": "a naïve ninja", "photo.jfif": "a .jfif photo"}
    assert "not UTF-8; read as Windows-1252" in caplog.text and "not valid UTF-8" in caplog.text
    for codec in ("utf-16-le", "utf-16-be"):  # no byte-order mark: the zero bytes say which
        (folder / "notepad.txt").write_bytes("a naïve ninja".encode(codec))
        assert T.read_caption(str(folder / "notepad.txt")) == "a naïve ninja"
    for mark, codec in ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be")):  # LE's mark begins
        (folder / "notepad.txt").write_bytes(mark + "a naïve ninja".encode(codec))  # as UTF-16's
        assert T.read_caption(str(folder / "notepad.txt")) == "a naïve ninja"
        (folder / "notepad.txt").write_bytes(mark + "a naïve ninja".encode(codec)[:-1])  # cut short: named
        with pytest.raises(T.UserError, match="notepad.txt' starts with a UTF-32 mark but is not UTF-32 .*save it"):
            T.read_caption(str(folder / "notepad.txt"))
    for text in (b"a cat\x00\n", b"masterpiece, best quality\x00"):  # a stray NUL from a script: dropped
        (folder / "notepad.txt").write_bytes(text)
        assert T.read_caption(str(folder / "notepad.txt")) == text.decode().strip("\x00\n")


def test_relative_paths_in_a_data_folder_and_images_stored_in_rows(tmp_path, caplog, monkeypatch):
    import datasets

    folder = tmp_path / "parquet"
    folder.mkdir()
    Image.new("RGB", (40, 32), "blue").save(folder / "img0.png")
    datasets.Dataset.from_dict({"image": ["img0.png"], "text": ["blue"]}).to_parquet(str(folder / "train.parquet"))
    table, _ = T.load_table(T.parse_args(["--dataset", str(folder)]))
    assert T.decode_image(table[0]["image"])[1] == (40, 32)  # beside the dataset, not in the cwd
    as_image = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": "img0.png"}], "text": ["blue"]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "text": datasets.Value("string")}))
    monkeypatch.chdir(folder)
    as_image.to_parquet("train.parquet")  # an Image column holding relative paths, no bytes
    monkeypatch.chdir(tmp_path)
    table, _ = T.load_table(T.parse_args(["--dataset", str(folder)]))
    assert table[0]["image"]["bytes"] is None and T.decode_image(table[0]["image"])[1] == (40, 32)
    # An earlier run's output folder inside a folder of data files: datasets would read its train_config.json as
    # data (as the "train" split, by its name), so it is refused until moved out. The folder given as "." too.
    flat = tmp_path / "flat"
    (flat / "out").mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (40, 32), "blue").save(png, format="PNG")
    datasets.Dataset.from_dict({"image": [png.getvalue()], "text": ["blue"]}).to_parquet(str(flat / "colors.parquet"))
    (flat / "out" / "train_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "x", "rank": 4}))
    monkeypatch.chdir(flat)
    for source in (str(flat), ".", "./"):
        with pytest.raises(T.UserError, match="holds an output folder of this trainer, '.*out', whose files "
                                              "datasets would read as data: move it out"):
            T.load_table(T.parse_args(["--dataset", source, "--output_dir", str(tmp_path / "elsewhere")]))
    shutil.move(flat / "out", tmp_path / "out")
    for source in (str(flat), ".", "./"):
        table, _ = T.load_table(T.parse_args(["--dataset", source, "--output_dir", str(tmp_path / "elsewhere")]))
        assert table["text"] == ["blue"] and T.decode_image(table[0]["image"])[1] == (40, 32), source
    with pytest.raises(T.UserError, match="holds an output folder of this trainer"):  # this run's, before it writes
        T.load_table(T.parse_args(["--dataset", ".", "--output_dir", "out"]))
    # A Hub download's shards with a caption column of another name: told to name it, not to train on one shard.
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for n in range(2):
        datasets.Dataset.from_dict({"image": [png.getvalue()], "long_description": ["blue"]}).to_parquet(
            str(tmp_path / "hub" / "data" / f"train-0000{n}-of-00002.parquet"))
    with pytest.raises(T.UserError, match="no caption column found among: image, long_description; name it with "
                                          "--caption_column$"):
        T.load_table(T.parse_args(["--dataset", str(tmp_path / "hub")]))
    monkeypatch.chdir(tmp_path)  # a save_to_disk folder whose paths are relative to where it was made
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (24, 32)).save(tmp_path / "imgs" / "a.png")
    datasets.Dataset.from_dict({"image": ["imgs/a.png"], "text": ["a"]}).save_to_disk("saved")
    before = sorted(os.listdir("saved"))
    table, _ = T.load_table(T.parse_args(["--dataset", "saved"]))
    assert T.decode_image(table[0]["image"])[1] == (24, 32) and sorted(os.listdir("saved")) == before  # not written
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    stored = datasets.Dataset.from_dict({"image": [b"junk", png.getvalue(), png.getvalue(), b""],
                                         "text": ["a", "b", "c", "d"]})
    stored.to_parquet(str(tmp_path / "stored.parquet"))
    args = T.parse_args(["--dataset", str(tmp_path / "stored.parquet"), "--max_train_samples", "3", "--seed", "1"])
    table, _ = T.load_table(args)
    subset = table["row"]  # the dataset's rows in the shuffled subset: messages name these, not positions
    T.plan_data(args, table, show_progress=False)  # as on every process but the first (no progress bar)
    bad = [r for r in subset if stored[r]["image"] in (b"junk", b"")]
    skipped = next(r.message for r in caplog.records if "unreadable" in r.message)
    assert bad and all(f"the image in row {r} " in skipped for r in bad), (subset, caplog.text)
    assert not any(f"row {r} " in skipped for r in subset if r not in bad)
    if 3 in bad:
        assert "the image in row 3 (empty image data)" in skipped
    # A Hub-style Image column with a null row: left out and counted, the others keep their row numbers.
    datasets.Dataset.from_dict({"image": [{"bytes": png.getvalue(), "path": None}, None] * 2, "text": list("abcd")},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).to_parquet(str(tmp_path / "holes.parquet"))
    table, _ = T.load_table(T.parse_args(["--dataset", str(tmp_path / "holes.parquet")]))
    assert table["row"] == [0, 2] and table["text"] == ["a", "c"]
    assert "2 of 4 rows of " in caplog.text and "name no image (null or an empty file name)" in caplog.text


def test_image_paths_resolve_beside_the_data_never_silently_elsewhere(tmp_path, caplog, monkeypatch, capsys):
    """Paths in a data file: beside it; else relative to the working directory (said); found nowhere, named
    beside the data, not opened from wherever the run started. Windows' backslashes and file:// read as paths,
    a URL is named as one; {bytes, path} rows without stored bytes resolve in every row of a plain parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (data / "imgs", elsewhere / "imgs"):
        folder.mkdir(parents=True)
    Image.new("RGB", (40, 32)).save(data / "imgs" / "a.png")
    Image.new("RGB", (16, 16)).save(elsewhere / "imgs" / "b.png")  # only in the working directory
    rows = [{"image": p, "text": p} for p in ("imgs\\a.png", "imgs/b.png", "imgs/gone.png",
                                               "https://cdn.example.com/c.png", f"file://{data}/imgs/a.png")]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(elsewhere)
    table, _ = T.load_table(T.parse_args(["--dataset", str(data / "train.jsonl")]))
    assert table["image"][:3] == [str(data / "imgs" / "a.png"), str(elsewhere / "imgs" / "b.png"),
                                  str(data / "imgs" / "gone.png")] and table["image"][4] == str(data / "imgs/a.png")
    assert "such as 'imgs/b.png' are found relative to the working directory" in caplog.text
    _, _, bad = T.scan_images(table, show_progress=False)
    assert [b[0] for b in bad] == [str(data / "imgs" / "gone.png"), "https://cdn.example.com/c.png"]
    assert "images are not downloaded" in bad[1][1]
    struct = pa.array([{"bytes": None, "path": "imgs/a.png"}] * 10 + [{"bytes": b"x", "path": None}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "text": ["a"] * 11}), data / "struct.parquet")  # no HF features
    table, _ = T.load_table(T.parse_args(["--dataset", str(data / "struct.parquet")]))
    assert [v["path"] for v in table["image"][:10]] == [str(data / "imgs" / "a.png")] * 10
    assert "hashed" not in capsys.readouterr().err + caplog.text  # datasets warned so on every local run
    win = tmp_path / "win"  # a folder given: its data file's folder is searched, a stray top-level a.png loses
    for folder in ("sub/imgs", "sub/cat"):
        (win / folder).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(win / folder / "a.png")
    Image.new("RGB", (8, 8)).save(win / "a.png")
    rows = [{"image": "C:\\Users\\me\\set\\imgs\\a.png", "text": "w"},
            {"image": "C:\\Users\\me\\set\\cat\\a.png", "text": "c"}, {"image": "D:\\gone\\z.png", "text": "z"}]
    (win / "sub" / "windows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # written on Windows
    table, _ = T.load_table(T.parse_args(["--dataset", str(win / "sub" / "windows.jsonl")]))
    assert table["image"] == [str(win / "sub" / "imgs" / "a.png"), str(win / "sub" / "cat" / "a.png"),
                              "D:\\gone\\z.png"]
    resolve = T.relative_to(str(win))  # the folder given: its data file's folder is searched before a.png at the top
    assert [resolve(r["image"]) for r in rows[:2]] == table["image"][:2]
    assert "are Windows paths: read as the files under the data that end the same way" in caplog.text
    # The same in an imagefolder's metadata.jsonl (datasets joins the folder and the file_name into one path), and a
    # folder whose accents macOS wrote decomposed, named composed in the metadata.
    folder = tmp_path / "imagefolder"
    (folder / "sub").mkdir(parents=True)
    (folder / unicodedata.normalize("NFD", "été")).mkdir()
    for name in ("sub/a.png", unicodedata.normalize("NFD", "été") + "/b.png"):
        Image.new("RGB", (16, 16)).save(folder / name)
    rows = [{"file_name": "C:\\Users\\me\\imagefolder\\sub\\a.png", "text": "a"}, {"file_name": "été/b.png", "text": "b"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.clear()
    table, _ = T.load_table(T.parse_args(["--dataset", str(folder)]))
    assert [T.read_size(v) for v in table["image"]] == [(16, 16)] * 2 and table["text"] == ["a", "b"]
    assert "not named in its metadata" not in caplog.text
    (data / "two.jsonl").write_text(json.dumps({"image": "imgs/a.png", "text": "photo", "caption": "a long one"}))
    assert T.load_table(T.parse_args(["--dataset", str(data / "two.jsonl")]))[0]["text"] == ["photo"]
    assert "caption column 'text' is used; the dataset also has 'caption': pass --caption_column" in caplog.text


def shard(path, *members, mode="w"):
    """A tar of (name, bytes) members, as WebDataset shards are written (mode "a" appends)."""
    import tarfile

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_more_dataset_shapes_load_or_say_what_they_are(tmp_path, caplog):
    """WebDataset shards load; a ClassLabel caption trains on the class names; a list's null items are never
    drawn. What cannot train is said in one line: several images per row, true/false captions, a JSON object
    of file name -> caption, a save_to_disk dict without train, an archive, Git LFS pointers, a JSON Lines column
    of text and lists, parquet shards that disagree, and no message quotes a base64 "path" in full."""
    import datasets

    load = lambda *argv: T.load_table(T.parse_args(["--dataset", *map(str, argv)]))[0]
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    shard(tmp_path / "wds" / "shard-000000.tar", ("000.png", png.getvalue()), ("000.txt", b"a shard's caption"))
    assert list(load(tmp_path / "wds")["text"]) == ["a shard's caption"]
    assert list(load(tmp_path / "wds" / "shard-000000.tar")["text"]) == ["a shard's caption"]
    # .caption members: bytes to datasets (it decodes .txt only), read as text
    for name, caption in (("utf8", "ein Quadrat, gr\u00fcn".encode()), ("latin1", "gr\u00fcn".encode("latin-1"))):
        shard(tmp_path / "wds-caption" / f"{name}.tar", ("000.png", png.getvalue()), ("000.caption", caption))
    assert list(load(tmp_path / "wds-caption" / "utf8.tar")["text"]) == ["ein Quadrat, gr\u00fcn"]
    # Saved by a Windows editor: no byte-order mark trains.
    shard(tmp_path / "wds-caption" / "bom.tar", ("000.png", png.getvalue()), ("000.txt", "\ufeffa red square".encode()))
    assert list(load(tmp_path / "wds-caption" / "bom.tar")["text"]) == ["a red square"]
    shard(tmp_path / "wds-caption" / "dots.tar", ("img.v2.0.png", png.getvalue()), ("img.v2.0.txt", b"a caption"))
    with pytest.raises(T.UserError, match="splits each WebDataset member's name at its first dot, so 'v2.0.png'"):
        load(tmp_path / "wds-caption" / "dots.tar")  # (datasets' key ends at the first dot)
    shard(tmp_path / "wds-caption" / "meta.tar", ("000.png", png.getvalue()), ("000.meta.json", b"{}"))
    with pytest.raises(T.UserError, match="WebDataset shards need a caption beside each image") as caught:
        load(tmp_path / "wds-caption" / "meta.tar")  # no caption at all: not a matter of dots
    assert "first dot" not in str(caught.value)
    with pytest.raises(T.UserError, match="caption column 'caption' .* holds bytes that are not UTF-8 text"):
        load(tmp_path / "wds-caption" / "latin1.tar")
    shard(tmp_path / "wds-latin1" / "00.tar", ("000.png", png.getvalue()), ("000.txt", b"a"),
          ("001.png", png.getvalue()), ("001.txt", "gr\u00fcn".encode("latin-1")))  # .txt: datasets decodes it
    with pytest.raises(T.UserError, match="001.txt in .*00.tar is not UTF-8: save the captions as UTF-8"):
        load(tmp_path / "wds-latin1")
    os.rename(tmp_path / "wds" / "shard-000000.tar", tmp_path / "wds" / "00000.tar")  # img2dataset's layout: the
    datasets.Dataset.from_dict({"url": ["http://x/0.png"], "caption": ["from the web"], "key": ["000"],  # parquet
                                "status": ["success"]}).to_parquet(str(tmp_path / "wds" / "00000.parquet"))  # lists
    (tmp_path / "wds" / "00000_stats.json").write_text("{}")  # what was downloaded
    assert list(load(tmp_path / "wds")["text"]) == ["a shard's caption"]
    Image.new("RGB", (32, 32)).save(tmp_path / "p.png")  # image records with a path or bytes alone: a pyarrow
    (tmp_path / "path_only.jsonl").write_text(json.dumps({"image": {"path": "p.png"}, "text": "a"}) + "\n")  # error
    assert load(tmp_path / "path_only.jsonl")[0]["image"]["path"] == str(tmp_path / "p.png")
    datasets.Dataset.from_dict({"image": [{"bytes": png.getvalue()}], "text": ["b"]}).to_parquet(
        str(tmp_path / "bytes_only.parquet"))
    assert load(tmp_path / "bytes_only.parquet")[0]["image"]["bytes"] == png.getvalue()
    (tmp_path / "typed.csv").write_text("Image,Caption\np.png,a red square\n")  # headers typed in a spreadsheet
    assert load(tmp_path / "typed.csv")["text"] == ["a red square"]
    (tmp_path / "meta_cap.json").write_text(json.dumps({"img000": {"caption": "a", "tags": "x"}, "img001": {
        "caption": "b"}}))  # (it was "no image column found among: img000, img001")
    with pytest.raises(T.UserError, match="is kohya's metadata JSON .* write each caption to a .txt file"):
        load(tmp_path / "meta_cap.json")
    (tmp_path / "kohya").mkdir()  # the same beside its images: named, not "pass it as --dataset" (which refuses it)
    os.rename(tmp_path / "meta_cap.json", tmp_path / "kohya" / "meta_cap.json")
    Image.new("RGB", (32, 32)).save(tmp_path / "kohya" / "img000.png")
    with pytest.raises(T.UserError, match="no captions.*meta_cap.json' is kohya's metadata JSON .*does not read"):
        load(tmp_path / "kohya")
    (tmp_path / "paths.jsonl").write_text(json.dumps({"images": ["p.png", "p.png"], "text": "two"}) + "\n")
    with pytest.raises(T.UserError, match="image column 'images' of dataset .* holds several images per row"):
        load(tmp_path / "paths.jsonl")  # ("'list' object has no attribute 'read'" for every row)
    with pytest.raises(T.UserError, match="'imagefolder' is the name of one of datasets' loaders, not a dataset"):
        load("imagefolder")  # datasets read every */train/ under the working folder
    shard(tmp_path / "gap" / "shard.tar", ("000.png", png.getvalue()), ("000.txt", b"a"), ("001.txt", b"b"),
          ("002.png", png.getvalue()), ("002.txt", b"c"))  # its second sample lost its image: that sample is named
    with pytest.raises(T.UserError, match="shard.tar: sample '001' has txt where the others have png, txt"):
        load(tmp_path / "gap")
    for n, (ext, fmt) in enumerate((("png", "PNG"), ("jpg", "JPEG"))):  # PNGs, then JPEGs: datasets dropped the
        image = io.BytesIO()  # second shard's images
        Image.new("RGB", (32, 32)).save(image, format=fmt)
        shard(tmp_path / "kinds" / f"shard-{n}.tar", (f"{n}.{ext}", image.getvalue()), (f"{n}.txt", b"a"))
    with pytest.raises(T.UserError, match="shard-0.tar holds png, txt and .*shard-1.tar jpg, txt: datasets reads"):
        load(tmp_path / "kinds")
    os.rename(tmp_path / "kinds" / "shard-1.tar", tmp_path / "shard-1.tar")
    shard(tmp_path / "kinds" / "shard-1.tar", ("1.JPG", png.getvalue()), ("1.txt", b"a"))  # .JPG: a column of its own
    with pytest.raises(T.UserError, match="shard-1.tar JPG, txt"):
        load(tmp_path / "kinds")
    # A shard packed on a Mac: its ._ resource forks are skipped, by datasets and by us.
    shard(tmp_path / "mac" / "shard.tar", ("000.png", png.getvalue()), ("._000.png", b"\0\5\x16\7"), ("000.txt", b"mac"))
    assert list(load(tmp_path / "mac")["text"]) == ["mac"]
    shard(tmp_path / "mac" / "shard.tar", ("__meta__.json", b"{}"), ("001.png", png.getvalue()), ("001.txt", b"more"),
          ("001.json", b"{}"), mode="a")  # datasets skips __ members; a later shard's extra field is dropped
    shard(tmp_path / "mac" / "shard-2.tar", ("002.png", png.getvalue()), ("002.txt", b"extra"), ("002.json", b"{}"))
    assert sorted(load(tmp_path / "mac")["text"]) == ["extra", "mac", "more"]
    labels = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    datasets.Dataset.from_dict({"image": [{"bytes": png.getvalue(), "path": None}] * 2, "label": [1, 0]},
                               features=labels).save_to_disk(str(tmp_path / "classes"))
    assert list(load(tmp_path / "classes", "--caption_column", "label")["text"]) == ["dog", "cat"]
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "x.png")], "text": [["a cat", None, ""]]})
    args = T.parse_args(["--dataset", "x", "--resolution", "32"])
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    ds = T.ImageCaptionDataset(table, args, T.DataPlan(targets=[(32, 32)]))
    assert {ds[(0, seed)]["caption"] for seed in range(20)} == {"a cat"}
    (tmp_path / "numbers.csv").write_text("image,text\nx.png,1\nx.png,\nx.png,3.5\n")  # one blank: floats
    assert load(tmp_path / "numbers.csv")["text"] == ["1", None, "3.5"]  # ("1.0" trained; the text cache holds these)
    for name, data, needle in (
            ("several", {"images": [[{"bytes": png.getvalue(), "path": None}] * 2], "text": ["two"]},
             "holds several images per row"),
            ("flags", {"image": [{"bytes": png.getvalue(), "path": None}], "text": [True]}, "holds true/false values")):
        features = datasets.Features({**({"images": [datasets.Image()]} if "images" in data else
                                         {"image": datasets.Image()}),
                                      "text": datasets.Value("bool" if name == "flags" else "string")})
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / f"{name}.parquet"))
        with pytest.raises(T.UserError, match=needle):
            load(tmp_path / f"{name}.parquet")
    (tmp_path / "captions.json").write_text(json.dumps({f"{i:05d}.png": f"caption {i}" for i in range(50)}))
    with pytest.raises(T.UserError, match=r"00011.png, … \(50 columns\).*mapping file names to captions: write it "
                                          r"as JSON Lines"):
        load(tmp_path / "captions.json")
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"image": ["x.png"], "text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"image": ["x.png"], "text": ["a"]})}
                         ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(T.UserError, match=r"has no 'train' split \(it has: validation, test\): pass the one to train "
                                          "on as --dataset_split"):
        load(tmp_path / "dd")
    assert list(load(tmp_path / "dd", "--dataset_split", "test")["text"]) == ["a"]
    assert len(load(tmp_path / "dd", "--dataset_split", "val")) == 1  # (val: the validation split)
    with pytest.raises(T.UserError, match=r"has no split 'tset' \(it has: validation, test\): pass one of them as "
                                          "--dataset_split"):
        load(tmp_path / "dd", "--dataset_split", "tset")
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped" / "images.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(T.UserError, match="images.zip is an archive: extract it first"):
        load(tmp_path / "zipped")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"
    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs" / "train.parquet").write_bytes(pointer)
    with pytest.raises(T.UserError, match="train.parquet is a Git LFS pointer, not the data: run `git lfs pull`"):
        load(tmp_path / "lfs")
    (tmp_path / "lfs.png").write_bytes(pointer)
    with pytest.raises(ValueError, match="a Git LFS pointer, not the image"):
        T.open_file(str(tmp_path / "lfs.png"))
    # Files that are not images say what they are, where the first bytes tell.
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "iphone.jpg").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    for name, why in (("empty.jpg", "an empty file"), ("iphone.jpg", "a HEIC/HEIF image .*: convert it to JPEG"),
                      ("link.png", f"a broken link to {tmp_path / 'gone.png'}")):
        with pytest.raises(ValueError, match=why):
            T.open_file(str(tmp_path / name))
    (tmp_path / "mixed.jsonl").write_text('{"image": "x.png", "text": "a"}\n{"image": "x.png", "text": ["a", "b"]}\n')
    if Version(datasets.__version__) >= Version("4.7"):
        assert len(load(tmp_path / "mixed.jsonl")) == 2  # datasets reads it; in an imagefolder's metadata it cannot:
    else:  # older datasets' JSON reader refuses a column of text and lists, in one line
        with pytest.raises(T.UserError, match="changed from string to array"):
            load(tmp_path / "mixed.jsonl")
    (tmp_path / "meta").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "meta" / "x.png")
    (tmp_path / "meta" / "metadata.jsonl").write_text((tmp_path / "mixed.jsonl").read_text().replace("image",
                                                                                                     "file_name"))
    with pytest.raises(T.UserError, match="holds text on line 1 and lists on line 2: make them all lists, or all"):
        load(tmp_path / "meta")
    (tmp_path / "backup").mkdir()  # uncaptioned images beside a .tar backup: still "no captions", not a dataset
    Image.new("RGB", (32, 32)).save(tmp_path / "backup" / "a.png")
    shard(tmp_path / "backup" / "old.tar", ("photos/a.png", (tmp_path / "backup" / "a.png").read_bytes()))
    with pytest.raises(T.UserError, match="has 1 images but no captions"):
        load(tmp_path / "backup")
    os.remove(tmp_path / "backup" / "a.png")
    with pytest.raises(T.UserError, match="WebDataset shards need a caption beside each image.*extract it first"):
        load(tmp_path / "backup")
    (tmp_path / "shards").mkdir()
    for name, column in (("a", "text"), ("b", "caption")):
        datasets.Dataset.from_dict({"image": ["x.png"], column: ["a"]}).to_parquet(
            str(tmp_path / "shards" / f"{name}.parquet"))
    with pytest.raises(T.UserError, match="the data files disagree on their columns or types"):
        load(tmp_path / "shards")
    assert T.describe_image("iVBORw0KGgo" * 1000).endswith("(11000 characters of base64: store images as files "
                                                           "or bytes)")
    assert T.describe_image("/mnt/" + "deep_folder/" * 40 + "a.png").endswith("a.png")  # a long path is a path


def test_nested_metadata_jpeg_members_typed_image_columns_and_odd_paths(tmp_path, monkeypatch):
    """Metadata files in sub-folders that name their captions differently are refused (datasets read all with
    one's columns, whichever it met first: a different half of the captions from run to run). A WebDataset's
    .jpeg members and a dataset's image column under another name (`photo`) are found by their type. `data//`
    loads as `data`; `~/a.png` in a data file is in the home folder. An imagefolder whose metadata names
    absolute paths, and a path with '::' in it, say what to do."""
    load = lambda *argv: T.load_table(T.parse_args(["--dataset", *map(str, argv)]))[0]
    for name in ("red.png", "sub/blue.png"):
        (tmp_path / "nested" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), name.split("/")[-1][:-4]).save(tmp_path / "nested" / name)
    (tmp_path / "nested" / "metadata.jsonl").write_text('{"file_name": "red.png", "text": "top"}\n')
    (tmp_path / "nested" / "sub" / "metadata.jsonl").write_text('{"file_name": "blue.png", "caption": "sub"}\n')
    with pytest.raises(T.UserError, match=r"name their captions differently \(metadata.jsonl has 'text', "
                                          r"sub/metadata.jsonl has 'caption'\).*same caption column"):
        load(tmp_path / "nested")
    (tmp_path / "nested" / "sub" / "metadata.jsonl").write_text('{"file_name": "blue.png", "text": "sub"}\n')
    assert sorted(load(f"{tmp_path / 'nested'}//")["text"]) == ["sub", "top"]
    # A header " text" is another column to datasets; metadata files it is not given (beside train/) don't count.
    (tmp_path / "nested" / "sub" / "metadata.jsonl").unlink()
    (tmp_path / "nested" / "sub" / "metadata.csv").write_text("file_name, text\nblue.png,sub\n")
    (tmp_path / "nested" / "metadata.jsonl").rename(tmp_path / "nested" / "metadata.csv")
    (tmp_path / "nested" / "metadata.csv").write_text("file_name,text\nred.png,top\n")
    with pytest.raises(T.UserError, match=r"metadata.csv has 'text', sub/metadata.csv has ' text'"):
        load(tmp_path / "nested")
    (tmp_path / "nested" / "sub").rename(tmp_path / "nested" / "train")
    (tmp_path / "nested" / "train" / "metadata.csv").write_text("file_name,caption\nblue.png,in train\n")
    assert list(load(tmp_path / "nested")["text"]) == ["in train"]
    # --dataset_split picks a split folder (val/ is the validation split), or says which there are.
    (tmp_path / "nested" / "val").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "nested" / "val" / "v.png")
    (tmp_path / "nested" / "val" / "metadata.csv").write_text("file_name,caption\nv.png,held out\n")
    assert list(load(tmp_path / "nested")["text"]) == ["in train"]
    assert list(load(tmp_path / "nested", "--dataset_split", "validation")["text"]) == ["held out"]
    with pytest.raises(T.UserError, match=r"has no test split folder \(it has: train, val\): pass one of theirs"):
        load(tmp_path / "nested", "--dataset_split", "test")
    # Images beside a test/ folder train, and test/ is held out: so with --dataset_split train as without it. A
    # metadata file above the folders (file_name: test/b.png) with --dataset_split test: test/'s rows alone.
    (tmp_path / "loose" / "test").mkdir(parents=True)
    for name in ("a.png", "test/b.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / "loose" / name)
    (tmp_path / "loose" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "loose"}\n'
                                                       '{"file_name": "test/b.png", "text": "test"}\n')
    for flags in ([], ["--dataset_split", "train"]):
        assert list(load(tmp_path / "loose", *flags)["text"]) == ["loose"]
    assert list(load(tmp_path / "loose", "--dataset_split", "test")["text"]) == ["test"]

    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32)).save(jpeg, format="JPEG")
    shard(tmp_path / "wds" / "000.tar", ("000.jpeg", jpeg.getvalue()), ("000.txt", b"a jpeg member"))
    table = load(tmp_path / "wds" / "000.tar")
    assert list(table["text"]) == ["a jpeg member"] and T.decode_image(table[0]["image"])[1] == (32, 32)
    photos = datasets.Dataset.from_dict({"id": [7], "photo": [Image.new("RGB", (32, 32))], "text": ["a photo"]})
    photos.cast_column("photo", datasets.Image()).to_parquet(str(tmp_path / "photos.parquet"))
    table = load(tmp_path / "photos.parquet")
    assert list(table["text"]) == ["a photo"] and T.decode_image(table[0]["image"])[1] == (32, 32)
    # Two columns of images and neither named as such (input_image, edited_image): which one is the data is asked.
    pairs = datasets.Dataset.from_dict({"input_image": [Image.new("RGB", (8, 8))], "edited_image": [Image.new(
        "RGB", (8, 8))], "text": ["edit"]}).cast_column("input_image", datasets.Image()).cast_column(
        "edited_image", datasets.Image())
    pairs.to_parquet(str(tmp_path / "pairs.parquet"))
    with pytest.raises(T.UserError, match="no image column found among: input_image, edited_image, text"):
        load(tmp_path / "pairs.parquet")

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "home" / "a.png")
    (tmp_path / "tilde.csv").write_text("image,text\n~/a.png,at home\n")
    table = load(tmp_path / "tilde.csv")
    assert table[0]["image"] == str(tmp_path / "home" / "a.png") and T.decode_image(table[0]["image"])[1] == (16, 16)

    (tmp_path / "abs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "abs" / "a.png")
    (tmp_path / "abs" / "metadata.jsonl").write_text(json.dumps({"file_name": str(tmp_path / "abs" / "a.png"),
                                                                 "text": "absolute"}) + "\n")
    with pytest.raises(T.UserError, match="relative to the metadata file's folder: write file_name so, or pass the "
                                          "metadata file itself as --dataset"):
        load(tmp_path / "abs")
    assert list(load(tmp_path / "abs" / "metadata.jsonl")["text"]) == ["absolute"]
    (tmp_path / "a::b").mkdir()
    shutil.copy(tmp_path / "photos.parquet", tmp_path / "a::b" / "photos.parquet")
    for path in (tmp_path / "a::b", tmp_path / "a::b" / "photos.parquet"):
        with pytest.raises(T.UserError, match="reads '::' in a path as a chain of file systems: rename it"):
            load(path)
