#!/usr/bin/env python
"""Build a tiny, randomly initialised SDXL-architecture pipeline folder, offline, in seconds.

    python scripts/make_tiny_sdxl.py OUT [--seed 0]

The folder has the exact layout of `stabilityai/stable-diffusion-xl-base-1.0` (unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, model_index.json), so the trainer and
`StableDiffusionXLPipeline.from_pretrained(OUT)` load it through their normal code paths. What is kept from the
real model: both CLIP text encoders (penultimate hidden states concatenated, pooled output of the second), the
"text_time" additional embedding (6 size numbers + pooled text), a VAE that downsamples by 8 with SDXL's scaling
factor, and SDXL's noise schedule. Everything else is shrunk (~1.5 M parameters in all).

The Hub is unreachable here, so the tokenizer is built from scratch: CLIP's byte-level BPE format (every byte,
every byte + "</w>", plus whole-word merges for a small English vocabulary). Any text tokenizes; common words
take one token, so prompts stay well under 77 tokens.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

WORDS = (
    "a an the of on in with and to is at by photo picture drawing painting image style art "
    "red green blue yellow orange purple pink white black grey gray brown cyan magenta "
    "circle square triangle star cross ring shape shapes dot line big small large tiny "
    "background left right top bottom center middle corner light dark bright pale "
    "cat dog man woman person face tree house car sky sea mountain flower pokemon character"
).split()


def bytes_to_unicode():
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters (used by byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_vocab():
    """CLIP-format BPE: every byte, every byte + "</w>", and merges that make each word of WORDS one token."""
    chars = list(bytes_to_unicode().values())
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for word in WORDS:  # merge each word left to right: "r e", "re d</w>"
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if " ".join(pair) not in merges:
                merges.append(" ".join(pair))
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def build_tokenizer(folder):
    """Write CLIP's vocab.json/merges.txt to `folder` and load them back (works with transformers 4 and 5)."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    if len(tok) != len(vocab):  # the silent 2-token failure mode of an offline load
        raise RuntimeError(f"tokenizer in {folder} has {len(tok)} tokens, expected {len(vocab)}")
    return tok


def tiny_unet_config():
    """UNet2DConditionModel kwargs of the tiny SDXL UNet (also built alone by scripts/benchmark.py)."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=80,  # = 32 (text_encoder) + 48 (text_encoder_2), concatenated as in SDXL
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 48,  # 6 size numbers x 8 + pooled text (48)
        norm_num_groups=32)


def build_pipeline(tmp, seed=0):
    """The tiny pipeline, in memory; `tmp` is a scratch folder for the tokenizer files."""
    import transformers
    transformers.logging.set_verbosity_error()  # its "torchvision is not installed" notices, on every import
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(os.path.join(tmp, "tokenizer"))
    vocab_size = len(tokenizer)
    text_kw = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   intermediate_size=37, num_attention_heads=4, layer_norm_eps=1e-5)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=3, hidden_act="quick_gelu", **text_kw))
    # Two widths, as SDXL's 768 and 1280: single-file loaders (diffusers', ComfyUI's) tell the encoders apart by them.
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=48, num_hidden_layers=3, hidden_act="gelu", projection_dim=48, **text_kw))
    # 4 blocks -> downsampling by 8, like SDXL's VAE; scaling_factor is SDXL's.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64, scaling_factor=0.13025)
    unet = UNet2DConditionModel(**tiny_unet_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=build_tokenizer(os.path.join(tmp, "tokenizer_2")), unet=unet,
                                     scheduler=scheduler)


def fix_tokenizer_config(folder):
    """Write model_max_length: 77 into the saved config: loaders that read only the JSON need it."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = 77
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write the pipeline to")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(tmp, args.seed)
    pipe.save_pretrained(args.out, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        fix_tokenizer_config(os.path.join(args.out, sub))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from train_sdxl_debias import portable_pipeline

    portable_pipeline(args.out)  # laid out as the Hub's SDXL is (CLIP-L under text_model., vocab.json + merges.txt)
    n = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    print(f"tiny SDXL ({n / 1e6:.2f} M parameters, vocab {len(pipe.tokenizer)}) written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
