"""Outputs other tools open (both LoRA formats, pipeline, single file), the model card, metrics, validation
grids, text-encoder LoRA, EMA, optimizers, timestep range and --config."""
import json
import os
import re
import shutil

import diffusers
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_sdxl_debias as T
from conftest import run_trainer


def generate(pipe, prompt="a red circle on a blue background"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.fixture(scope="module")
def te_lora_run(tiny_model, shapes, tmp_path_factory):
    """One LoRA run with text-encoder training, two validation prompts and flags from a YAML --config."""
    out = str(tmp_path_factory.mktemp("te") / "my-lora")
    config = str(tmp_path_factory.mktemp("cfg") / "run.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"pretrained_model_name_or_path": tiny_model, "dataset_name": shapes, "resolution": 64,
                        "train_batch_size": 2, "max_train_steps": 4, "learning_rate": 5e-3,
                        "scale_lr": True,  # × batch 2: 1e-2 and 5e-3, as the card must say
                        "train_text_encoder": True, "text_encoder_lr": 2.5e-3, "logging_steps": 1,
                        "rank": 4, "lora_alpha": 2,  # alpha != rank: each file must carry the scale itself
                        "lora_dropout": 0.1,  # training only: diffusers generated with it on from our file
                        "validation_prompt": ["a red circle", "a blue square"], "num_validation_images": 2,
                        "validation_steps": 2, "validation_inference_steps": 2, "checkpointing_steps": 2}, f)
    proc = run_trainer("--config", config, "--output_dir", out, "--seed", "4")
    return out, proc


def test_both_lora_formats_load_and_give_the_same_image(te_lora_run, tiny_model):
    from diffusers import StableDiffusionXLPipeline

    out, _ = te_lora_run
    kohya = load_file(os.path.join(out, "my-lora.safetensors"))
    assert any(k.startswith("lora_te1_text_model_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) and
               k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    diffusers_file = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    for part in ("text_encoder.", "text_encoder_2."):  # text_model. as transformers 4 names it, for older stacks
        keys = [k for k in diffusers_file if k.startswith(part)]
        assert keys and all(k.startswith(part + "text_model.encoder.layers.") for k in keys), keys[:3]
    # Checkpoints export both, the kohya file named for its step (kohya's names: they keep apart in one folder).
    assert os.path.exists(os.path.join(out, "checkpoint-2", "my-lora-step00000002.safetensors"))
    # An output folder named like diffusers' file: the kohya file must not overwrite it.
    assert T.kohya_name("runs/pytorch_lora_weights") == "pytorch_lora_weights_kohya.safetensors"
    with safe_open(os.path.join(out, "my-lora.safetensors"), "pt") as f:  # what kohya's tools and WebUIs read
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert float(meta["ss_network_dim"]) == 4 and float(meta["ss_network_alpha"]) == 2
    assert meta["ss_v_parameterization"] == "False" and "ss_network_args" not in meta  # no conv layers here
    assert meta["ss_sd_model_name"] == os.path.basename(tiny_model) and meta["ss_output_name"] == "my-lora"
    # Stability's model spec, by which ComfyUI, Forge and SwarmUI sort a file as an SDXL LoRA
    assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == ("stable-diffusion-xl-v1-base/lora",
                                                                                  "epsilon")

    # diffusers hands this metadata to LoraConfig(**...) as it is: a field an older peft lacks (peft 0.21 writes
    # a dozen that 0.17 refuses) would make the file unloadable there. Every field kept is one peft 0.9 has.
    with safe_open(os.path.join(out, "pytorch_lora_weights.safetensors"), "pt") as f:
        adapters = json.loads(f.metadata()["lora_adapter_metadata"])
    assert {k.split(".", 1)[1] for k in adapters} <= {"r", "lora_alpha", "target_modules", "lora_dropout", "bias",
                                                      "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern",
                                                      "alpha_pattern"}, adapters
    assert (adapters["unet.r"], adapters["unet.lora_alpha"], adapters["text_encoder_2.lora_dropout"]) == (4, 2, 0)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    base = generate(pipe)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    from_diffusers = generate(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name="my-lora.safetensors")
    from_kohya = generate(pipe)
    assert np.abs(from_diffusers - base).mean() > 1e-3
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-5)


def test_a_run_starts_from_a_lora_file_of_either_format(te_lora_run, tiny_model, shapes, tmp_path):
    # kohya's --network_weights: continue training a LoRA from its file. The run's files (rank 4, alpha 2, text
    # encoders too) read back as the same LoRA from kohya's names, peft's and those diffusers' scripts write.
    from diffusers import StableDiffusionXLPipeline

    out, _ = te_lora_run
    saved = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    scripts = str(tmp_path / "diffusers-script.safetensors")  # names of convert_state_dict_to_diffusers
    save_file({k.replace(".lora_A.", ".lora.down." if k.startswith("unet.") else ".lora_linear_layer.down.")
               .replace(".lora_B.", ".lora.up." if k.startswith("unet.") else ".lora_linear_layer.up."): v
               for k, v in saved.items()}, scripts)  # (no alpha in it: diffusers' scripts train alpha = rank)
    models = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    for source, alpha in ((os.path.join(out, "my-lora.safetensors"), 2.0), (out, 2.0), (scripts, 4.0)):
        args = T.parse_args(["--dataset", shapes, "--network_weights", source, "--train_text_encoder"])
        states, te_targets = T.read_lora_file(args, *models[:1], models[1:])
        assert (args.rank, args.lora_alpha, args.lora_target_modules) == (4, alpha, "to_k,to_out.0,to_q,to_v")
        projections = ["k_proj", "out_proj", "q_proj", "v_proj"]  # text encoder 1's on all layers but its unused last
        first = [f"encoder.layers.{i}.self_attn.{p}" for i in range(models[1].config.num_hidden_layers - 1)
                 for p in projections]
        assert [[t.removeprefix("text_model.") for t in te_targets[0]], te_targets[1]] == [first, projections], source
        for prefix, state, model in zip(("unet.", "text_encoder.", "text_encoder_2."), states, models):
            want = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
            if T.flattened_clip(model):
                want = {k.removeprefix("text_model."): v for k, v in want.items()}
            assert state.keys() == want.keys() and all(torch.equal(state[k], v) for k, v in want.items()), source
    # The same targets in another order are the file's; a kohya layer without .alpha has alpha = rank (4 here,
    # not the others' 2: refused, not trained at another strength); per-layer patterns are refused.
    kohya = load_file(os.path.join(out, "my-lora.safetensors"))
    T.read_lora_file(T.parse_args(["--dataset", shapes, "--network_weights", os.path.join(out, "my-lora.safetensors"),
                                   "--train_text_encoder", "--lora_target_modules", "to_v,to_q,to_out.0,to_k"]),
                     pipe.unet, models[1:])
    cases = {"alpha_missing": ({k: v for k, v in kohya.items() if not k.startswith("lora_te1_") or
                                not k.endswith(".alpha")}, {}, r"several alphas \(2, 4\)"),
             "alpha_pattern": (saved, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2, "unet.alpha_pattern":
                                                                             {"to_q": 8}})}, "alpha_pattern")}
    for name, (tensors, metadata, needle) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        args = T.parse_args(["--dataset", shapes, "--network_weights", str(tmp_path / f"{name}.safetensors"),
                             "--train_text_encoder"])
        with pytest.raises(T.UserError, match=needle):
            T.read_lora_file(args, pipe.unet, models[1:])
    T.add_lora(pipe.unet, T.parse_args(["--dataset", shapes]), ["to_q"], False)
    with pytest.raises(T.UserError, match=r"does not fit this model: size mismatch for down_blocks"):
        T.load_adapter_state(pipe.unet, {k: torch.zeros(4, 3) for k in T.lora_layers(pipe.unet)}, "a file")
    # End to end, from the kohya file at learning rate 0: the LoRA comes out as it went in.
    again = str(tmp_path / "again")
    proc = run_trainer("--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir", again,
                       "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1", "--learning_rate",
                       "0", "--train_text_encoder", "--network_weights", os.path.join(out, "my-lora.safetensors"),
                       "--validation_prompt", "a red circle", "--validation_inference_steps", "2")
    assert "starting from the LoRA of" in proc.stderr and "rank 4, alpha 2" in proc.stderr
    card = open(os.path.join(again, "README.md")).read()  # its step-0 grid shows that LoRA, not the base model
    start = os.path.join(out, "my-lora.safetensors")
    assert f"first grid: the LoRA of `{start}` before training" in card and f"| network_weights | {start} |" in card
    resaved = load_file(os.path.join(again, "pytorch_lora_weights.safetensors"))
    assert resaved.keys() == saved.keys() and all(torch.equal(resaved[k], v) for k, v in saved.items())
    for extra, needle in ((["--rank", "8", "--train_text_encoder"], "--rank 8: --network_weights"),
                          ([], "add --train_text_encoder")):
        proc = run_trainer("--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir",
                           str(tmp_path / "refused"), "--network_weights", out, "--resolution", "64", *extra,
                           check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: ") and needle in last, last


def test_a_lora_on_every_layer_type_loads_whole_from_both_files(tiny_model, shapes, tmp_path):
    """Attention, feed-forward, resnet, sampler, embedding and in/out convs: diffusers must load every trained
    layer from the diffusers file and from the kohya file (SGM names), none dropped, with our weights."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    targets = ("to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,"
               "time_emb_proj,conv,conv_in,conv_out,linear_1")
    out = str(tmp_path / "all-layers")
    run_trainer("--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir", out,
                "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2",
                "--lora_target_modules", targets)
    ours = {k.removeprefix("unet."): v for k, v in load_file(os.path.join(out, "pytorch_lora_weights.safetensors")).items()}
    kohya = load_file(os.path.join(out, "all-layers.safetensors"))
    with safe_open(os.path.join(out, "all-layers.safetensors"), "pt") as f:  # 3x3 convs: kohya's conv_dim/alpha
        assert json.loads(f.metadata()["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    assert any("input_blocks" in k for k in kohya) and not any("down_blocks" in k for k in kohya)  # kohya's SDXL names
    assert len([k for k in kohya if k.endswith(".alpha")]) * 2 == len(ours)
    for weight_name in ("pytorch_lora_weights.safetensors", "all-layers.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
        if weight_name == "all-layers.safetensors" and Version(diffusers.__version__) < Version("0.39"):
            with pytest.raises(ValueError, match="label_emb.* not supported"):  # older diffusers maps no kohya
                pipe.load_lora_weights(out, weight_name=weight_name, adapter_name="x")  # time_embed/label_emb keys
            continue
        pipe.load_lora_weights(out, weight_name=weight_name, adapter_name="x")
        loaded = get_peft_model_state_dict(pipe.unet, adapter_name="x")
        assert sorted(loaded) == sorted(ours), (weight_name, set(ours) ^ set(loaded))
        for k, v in ours.items():
            torch.testing.assert_close(loaded[k].reshape(v.shape), v, msg=f"{weight_name}: {k}")


def test_a_dora_run_saves_a_diffusers_file_that_loads_and_resumes(tiny_model, shapes, tmp_path):
    """DoRA on the UNet and both text encoders: diffusers loads every trained weight, magnitudes included (under
    peft's key name transformers 5 re-initialised the text encoders' ones without a word), and a run resumes."""
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "dora")
    argv = ["--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir", out, "--resolution",
            "64", "--train_batch_size", "2", "--learning_rate", "1e-2", "--use_dora", "--checkpointing_steps", "2",
            "--train_text_encoder"]
    run_trainer(*argv, "--max_train_steps", "2")
    proc = run_trainer(*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr and not os.path.exists(os.path.join(out, "dora.safetensors"))
    assert "--use_dora: only pytorch_lora_weights.safetensors (diffusers) is written" in proc.stderr
    assert "DoRA has no kohya-format equivalent" in open(os.path.join(out, "README.md")).read()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    base = generate(pipe)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    assert np.abs(generate(pipe) - base).mean() > 1e-4
    saved = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        loaded = {n: p for n, p in getattr(pipe, name).named_parameters() if "lora_magnitude_vector" in n}
        layer = lambda key: key.split(".lora_magnitude_vector")[0].removeprefix("text_model.")  # one per layer
        ours = {layer(k.removeprefix(name + ".")): v for k, v in saved.items()
                if k.startswith(name + ".") and "lora_magnitude_vector" in k}
        assert loaded and {layer(n) for n in loaded} == ours.keys(), name
        for n, p in loaded.items():  # `….lora_magnitude_vector.default_0.weight`: the file's, each one
            torch.testing.assert_close(p.detach(), ours[layer(n)], msg=f"{name}: {n}")


def test_text_encoder_lora_changes_the_text_encoders(te_lora_run, tiny_model):
    from diffusers import StableDiffusionXLPipeline

    out, _ = te_lora_run
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    ids = pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids
    before = [te(ids, output_hidden_states=True).hidden_states[-2] for te in (pipe.text_encoder, pipe.text_encoder_2)]
    pipe.load_lora_weights(out, weight_name="my-lora.safetensors")
    after = [te(ids, output_hidden_states=True).hidden_states[-2] for te in (pipe.text_encoder, pipe.text_encoder_2)]
    for b, a in zip(before, after):
        assert (a - b).abs().max() > 1e-3


def test_validation_grids_model_card_and_metrics(te_lora_run, tiny_model, shapes):
    out, proc = te_lora_run
    assert "new text entries" not in proc.stderr  # text-encoder training turns the embedding cache off
    grids = sorted(os.listdir(os.path.join(out, "samples")))
    assert grids == ["step_000000.png", "step_000002.png", "step_000004.png"]  # the base model first
    assert Image.open(os.path.join(out, "samples", grids[0])).size == (2 * 64, 2 * 64)  # 2 images x 2 prompts
    card = open(os.path.join(out, "README.md")).read()
    for needle in (tiny_model, shapes, "arxiv.org/abs/2310.08442", "debias", "load_lora_weights",
                   "samples/step_000000.png", "my-lora.safetensors", "| learning_rate | 0.005 × 2 (--scale_lr) = 0.01 |",
                   "| lora_alpha | 2.0 |", "| lora_target_modules | to_q,to_k,to_v,to_out.0 |",
                   "| steps | 4 |", "| mixed_precision | no |", "| last logged loss | ", "(24 images)"):
        assert needle in card, needle
    header = yaml.safe_load(card.split("---\n")[1])  # the Hub's metadata: a local base is no Hub id, so left out
    assert header["library_name"] == "diffusers" and "lora" in header["tags"] and "base_model" not in header
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    buckets = [f"t_{b * 100:03d}_{b * 100 + 99:03d}" for b in range(10)]
    for row in rows:
        for key in ("step", "epoch", "loss", "mse", "lr", "grad_norm", "samples_per_s"):
            assert row[key] is not None
        for b in buckets:
            assert f"loss_{b}" in row and f"mse_{b}" in row
        seen = [b for b in buckets if row[f"loss_{b}"] is not None]
        assert seen and all(row[f"mse_{b}"] is not None for b in seen)
    assert os.path.exists(os.path.join(out, "loss.png"))  # matplotlib is in the test requirements


def test_config_round_trips_through_train_config_json(te_lora_run):
    out, _ = te_lora_run
    path = os.path.join(out, "train_config.json")
    saved = json.load(open(path))
    assert saved["train_text_encoder"] is True and saved["validation_prompt"] == ["a red circle", "a blue square"]
    assert saved["mixed_precision"] == "no"  # resolved (an `accelerate launch --mixed_precision` counts), not null
    again = {k: v for k, v in vars(T.parse_args(["--config", path])).items() if k not in T.NOT_SAVED}
    assert again == saved
    assert "resume_from_checkpoint" not in saved  # rerunning the file reproduces the run, it does not resume it


@pytest.mark.parametrize("values,needle", [
    ({"finetune": "LoRA"}, "must be one of"), ({"random_flip": "false"}, "true or false"),
    ({"optimizer": "adam"}, "must be one of"), ({"resolution": "big"}, "wrong type"), ({"bogus": 1}, "unknown keys"),
    ({"rank": 1.7}, "wrong type"), ({"resolution": True}, "wrong type"), ({"report_to": ["tensorboard"]}, "one value"),
    ({"resolution": [64]}, "one value")])
def test_config_values_are_checked_like_flags(tmp_path, values, needle):
    path = str(tmp_path / "bad.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"dataset": "x", **values}, f)
    with pytest.raises(T.UserError, match=needle):
        T.parse_args(["--config", path])
    with open(path, "w") as f:
        yaml.safe_dump({"dataset": "x", "validation_prompt": "a ninja", "random_flip": True}, f)
    args = T.parse_args(["--config", path, "--seed", "9"])
    assert args.validation_prompt == ["a ninja"] and args.random_flip is True and args.seed == 9
    assert T.parse_args(["--dataset", "x", "--lora_alpha", "0.5"]).lora_alpha == 0.5  # kohya's alphas are floats
    assert T.parse_args(["--config", path, "--validation_prompt", "a cat"]).validation_prompt == ["a cat"]
    with open(path, "w") as f:
        f.write("dataset: x\nmixed_precision: no\n")  # YAML reads an unquoted no as false
    assert T.parse_args(["--config", path]).mixed_precision == "no"
    with open(path, "w") as f:  # a YAML list, and the spaces a hand-written comma list has
        yaml.safe_dump({"dataset": "x", "lora_target_modules": ["to_q", " to_k"]}, f)
    args = T.parse_args(["--config", path])
    args.output_dir = str(tmp_path / "out")
    T.validate(args)
    assert args.lora_target_modules == "to_q,to_k"


def test_config_files_as_people_write_them(tmp_path):
    """Empty values mean the default (not None, which crashed after the models loaded); the file is read as UTF-8
    on every OS or as UTF-16 with its mark (PowerShell), and named when it is neither; .YAML is YAML; kohya's TOML
    files are read with their [sections] flattened, and kohya's own key names are named with ours."""
    (tmp_path / "blank.yaml").write_text("dataset: x\nlearning_rate:\nresolution: 512.0\ntrain_batch_size:\n")
    args = T.parse_args(["--config", str(tmp_path / "blank.yaml")])
    assert (args.learning_rate, args.resolution, args.train_batch_size) == (1e-4, 512, 1)
    (tmp_path / "utf16.YAML").write_bytes("dataset: x\nvalidation_prompt: un café\n".encode("utf-16"))
    assert T.parse_args(["--config", str(tmp_path / "utf16.YAML")]).validation_prompt == ["un café"]
    (tmp_path / "latin.yaml").write_bytes("dataset: x\nvalidation_prompt: un café\n".encode("cp1252"))
    with pytest.raises(T.UserError, match="latin.yaml' is not UTF-8: save it as UTF-8"):
        T.parse_args(["--config", str(tmp_path / "latin.yaml")])
    (tmp_path / "run.toml").write_text('[model]\npretrained_model_name_or_path = "m"\n[training]\nrank = 8\n'
                                       'learning_rate = 2e-4\ndataset = "x"\n')
    args = T.parse_args(["--config", str(tmp_path / "run.toml")])
    assert (args.pretrained_model_name_or_path, args.rank, args.learning_rate) == ("m", 8, 2e-4)
    (tmp_path / "blank.toml").write_text('dataset = "x"\ncaption_extension = ""\nmixed_precision = ""\n'
                                         'seed = ""\nvariant = ""\n')  # TOML has no null: "" is a field left blank
    args = T.parse_args(["--config", str(tmp_path / "blank.toml")])
    assert (args.caption_extension, args.mixed_precision, args.seed, args.variant) == (None, None, 0, None)
    (tmp_path / "kohya.toml").write_text("[training_arguments]\nnetwork_dim = 8\nflip_aug = true\n")
    with pytest.raises(T.UserError, match=r"unknown keys: network_dim \(use --rank\), flip_aug \(use --random_flip"):
        T.parse_args(["--config", str(tmp_path / "kohya.toml")])
    (tmp_path / "dataset.toml").write_text('[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 1024\n'
                                           '[[datasets.subsets]]\nimage_dir = "img"\nnum_repeats = 10\n')
    with pytest.raises(T.UserError, match=r"unknown keys: datasets \(kohya's dataset config is not read: pass the "
                                          r"images' folder with --train_data_dir \(a subset's num_repeats is its"):
        T.parse_args(["--config", str(tmp_path / "dataset.toml")])  # (it was "unknown keys: datasets")
    with pytest.raises(T.UserError, match=r"'--timestep_bias_portion=0.5' \(use --min_timestep / --max_timestep"):
        T.parse_args(["--dataset", "x", "--timestep_bias_portion=0.5"])
    with pytest.raises(T.UserError, match="--resolution -64 must be a positive multiple of 8"):
        T.validate(T.parse_args(["--dataset", "x", "--resolution", "-64"]))
    with pytest.raises(T.UserError, match="--resolution 16 is below 64 px"):  # (a GroupNorm traceback)
        T.validate(T.parse_args(["--dataset", "x", "--resolution", "16"]))


def test_an_error_about_a_flag_from_the_config_file_says_so(tmp_path, capsys):
    path = str(tmp_path / "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"dataset": str(tmp_path), "resolution": 100, "proportion_empty_prompts": 2.0}, f)
    out = ["--output_dir", str(tmp_path / "out")]
    assert T.main(["--config", path, *out]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: --resolution 100 must be a positive multiple of 8 (the VAE downsamples by 8) " \
                   f"(--resolution is set in --config {path!r})"
    assert T.main(["--config", path, *out, "--resolution", "64"]) == 2  # next problem, under its other name
    assert f"(--caption_dropout is set in --config {path!r})" in capsys.readouterr().err
    assert T.main(["--config", path, *out, "--resolution", "60"]) == 2  # typed: the command line is the origin
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --resolution 60 must") and "set in --config" not in last


def test_ema_weights_are_validated_and_saved_in_one_dtype_from_an_fp16_variant(tiny_model, shapes, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    base = str(tmp_path / "base")  # a base model with fp16-variant files, as stabilityai's repos have
    StableDiffusionXLPipeline.from_pretrained(tiny_model).to(torch.float16).save_pretrained(base, variant="fp16")
    out = str(tmp_path / "ema")
    argv = ["--pretrained_model_name_or_path", base, "--variant", "fp16", "--dataset", shapes, "--resolution", "64",
            "--train_batch_size", "2", "--finetune", "full", "--use_ema", "--ema_decay", "0.5", "--max_train_steps",
            "3", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--optimizer", "adafactor",
            "--save_single_file"]
    run_trainer(*argv, "--output_dir", out)
    resumed = str(tmp_path / "resumed")  # from step 2: the same UNet and EMA, and no library warnings on the way
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    proc = run_trainer(*argv, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr and "FutureWarning" not in proc.stderr
    for part in ("unet", "unet_ema"):
        a, b = (UNet2DConditionModel.from_pretrained(os.path.join(run, "checkpoint-3"), subfolder=part).state_dict()
                for run in (out, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    dtypes = set()  # the saved pipeline is fp32 throughout, like the trained UNet (not fp16 encoders beside it)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for name in os.listdir(os.path.join(out, part)):
            if name.endswith(".safetensors"):
                dtypes |= {(part, v.dtype) for v in load_file(os.path.join(out, part, name)).values()}
    assert {d for _, d in dtypes} == {torch.float32} and len({p for p, _ in dtypes}) == 4, dtypes
    saved = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    raw = UNet2DConditionModel.from_pretrained(os.path.join(out, "checkpoint-3"), subfolder="unet").state_dict()
    ema = UNet2DConditionModel.from_pretrained(os.path.join(out, "checkpoint-3"), subfolder="unet_ema").state_dict()
    diff_raw = sum((saved[k] - raw[k]).abs().sum() for k in saved)
    diff_ema = sum((saved[k] - ema[k]).abs().sum() for k in saved)
    assert diff_raw > 1e-3 and diff_ema < 1e-6  # the EMA, not the raw weights, is what got saved
    # --save_single_file: the whole model in the original SDXL layout, read back by diffusers' own converters
    # (those of from_single_file; A1111/ComfyUI read these names), weight for weight, in the training dtype.
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextModelWithProjection
    single = load_file(os.path.join(out, "ema.safetensors"))
    assert {k.split(".")[0] for k in single} == {"model", "first_stage_model", "conditioner"}
    assert "`ema.safetensors` is the whole model in one file" in open(os.path.join(out, "README.md")).read()
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    te2 = CLIPTextModelWithProjection.from_pretrained(out, subfolder="text_encoder_2")
    for part, back in (
            ("unet", sf.convert_ldm_unet_checkpoint(single, dict(pipe.unet.config))),
            ("vae", sf.convert_ldm_vae_checkpoint(single, dict(pipe.vae.config))),
            ("text_encoder", sf.convert_ldm_clip_checkpoint(single)),
            ("text_encoder_2", sf.convert_open_clip_checkpoint(te2, single, "conditioner.embedders.1.model."))):
        want = getattr(pipe, part).state_dict()
        back = {k.removeprefix("text_model.") if k not in want else k: v for k, v in back.items()}  # (flat CLIP-L)
        assert back.keys() == want.keys(), (part, sorted(back.keys() ^ want.keys())[:4])
        assert all(back[k].dtype == torch.float32 and torch.equal(back[k].reshape(want[k].shape), want[k])
                   for k in want), part  # (fp32: this run had no --mixed_precision)
    assert "v_pred" not in single  # ComfyUI samples a checkpoint with this key as v-prediction, ztsnr as zero SNR
    pipe.scheduler.register_to_config(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    state = T.sdxl_checkpoint(pipe, torch.bfloat16)
    assert "v_pred" in state and "ztsnr" in state and {v.dtype for v in state.values()} == {torch.bfloat16}


def test_a_checkpoint_file_trains_the_same_lora_as_its_diffusers_folder(tiny_model, model_files, shapes, tmp_path):
    # Most SDXL models users fine-tune exist only as one .safetensors (A1111, ComfyUI, kohya). The file written
    # from the tiny pipeline trains the very LoRA its folder trains, and the card loads it the way it was read.
    trained = {}
    for name, base in (("folder", [tiny_model]),
                       ("file", [os.path.join(model_files, "tiny.safetensors"), "--single_file_config", tiny_model]),
                       ("vae_file", [tiny_model, "--pretrained_vae_model_name_or_path",
                                     os.path.join(model_files, "vae.safetensors")])):  # (A1111's sdxl_vae.safetensors)
        out = str(tmp_path / name)
        run_trainer("--pretrained_model_name_or_path", *base, "--dataset", shapes, "--output_dir", out,
                    "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate",
                    "1e-2", "--seed", "5")
        trained[name] = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    for name in ("file", "vae_file"):
        assert trained[name].keys() == trained["folder"].keys()
        assert all(torch.allclose(trained[name][k], v, atol=1e-6) for k, v in trained["folder"].items()), name
    assert any(v.abs().sum() > 0 for k, v in trained["file"].items() if "lora_B" in k)  # it did train
    card = open(os.path.join(tmp_path, "file", "README.md")).read()
    assert f"from_single_file({os.path.join(model_files, 'tiny.safetensors')!r}, config={tiny_model!r}" in card
    # The card of the run with its own VAE names it and loads it (the usage code run here, on the CPU).
    card = open(os.path.join(tmp_path, "vae_file", "README.md")).read()
    assert f"VAE used for training: `{os.path.join(model_files, 'vae.safetensors')}`" in card
    usage = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace = {}
    exec(usage.replace("torch.float16", "torch.float32").replace('.to("cuda")', "").split("image = ")[0], namespace)
    assert namespace["pipe"].vae is namespace["vae"] and namespace["pipe"].get_list_adapters()
    # The configs and tokenizers shape what the file's encoders output: another config, other cache entries.
    other = str(tmp_path / "other-config")
    shutil.copytree(tiny_model, other)
    namespaces = [T.cache_namespaces(T.parse_args(["--dataset", "x", "--pretrained_model_name_or_path",
                                                   os.path.join(model_files, "tiny.safetensors"),
                                                   "--single_file_config", config]), torch.float32)
                  for config in (tiny_model, other)]
    assert namespaces[0][0] != namespaces[1][0] and namespaces[0][1] != namespaces[1][1]


def test_a_v_prediction_checkpoint_file_trains_and_saves_as_v_with_zero_terminal_snr(tiny_model, model_files,
                                                                                      shapes, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "v-full")  # ComfyUI's v_pred/ztsnr keys (NoobAI-XL's v-pred files carry them)
    proc = run_trainer("--pretrained_model_name_or_path", os.path.join(model_files, "vpred.safetensors"),
                       "--single_file_config", tiny_model, "--finetune", "full", "--save_single_file",
                       "--pretrained_vae_model_name_or_path", os.path.join(model_files, "vae.safetensors"),
                       "--dataset", shapes, "--output_dir", out, "--resolution", "64", "--train_batch_size", "2",
                       "--max_train_steps", "1", "--learning_rate", "1e-4")
    assert "with debias loss (v_prediction)" in proc.stderr
    scheduler = StableDiffusionXLPipeline.from_pretrained(out).scheduler.config
    assert scheduler.prediction_type == "v_prediction" and scheduler.rescale_betas_zero_snr
    with safe_open(os.path.join(out, "v-full.safetensors"), "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())  # and carried on to the single file written
    assert_read_by_older_tools(out)


def assert_read_by_older_tools(pipeline):
    """A saved pipeline as the Hub's SDXL holds it: CLIP-L's weights under text_model. (transformers 4 silently
    re-initialised an encoder saved without it; ComfyUI looks for text_model.encoder.layers.0.mlp.fc1.weight),
    and vocab.json + merges.txt beside each tokenizer.json, which alone tokenize as the saved tokenizer does
    (transformers 4's CLIPTokenizer reads only those)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    with safe_open(os.path.join(pipeline, "text_encoder", "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
        assert "text_model.encoder.layers.0.mlp.fc1.weight" in f.keys()
    for name in ("tokenizer", "tokenizer_2"):
        folder = os.path.join(pipeline, name)
        saved = AutoTokenizer.from_pretrained(folder)
        slow = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))  # those alone
        text = "a red square, photo of a sks dog; 2024!"
        assert len(slow) == len(saved) > 100 and slow(text).input_ids == saved(text).input_ids


def test_timestep_range_is_respected(tiny_model, shapes, tmp_path):
    out = str(tmp_path / "trange")
    run_trainer("--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir", out,
                "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "3", "--logging_steps", "1",
                "--min_timestep", "500", "--max_timestep", "600", "--input_perturbation", "0.1")
    for row in (json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))):
        filled = [k for k in row if k.startswith("loss_t_") and row[k] is not None]
        assert filled == ["loss_t_500_599"]


def test_v_prediction_lora_card_samples_it_as_v_and_its_code_runs_as_python(tiny_model, shapes, tmp_path):
    import ast
    import re
    from safetensors import safe_open

    out = str(tmp_path / "v-lora")
    run_trainer("--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir", out,
                "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1",
                "--prediction_type", "v_prediction", "--validation_prompt", 'a "quoted" square',
                "--num_validation_images", "1", "--validation_inference_steps", "1")
    card = open(os.path.join(out, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    ast.parse(code)  # a prompt with quotes must not break the snippet
    assert "prediction_type='v_prediction'" in code  # the base model's scheduler would sample ε
    assert "√SNR/(SNR+1)" in card and "prediction type `v_prediction`" in card
    assert "ModelSamplingDiscrete node set to `v_prediction`" in card  # ComfyUI would sample it as ε
    with safe_open(os.path.join(out, "v-lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_v_parameterization"] == "True"  # kohya's flag (sd-scripts; the WebUIs ignore it)


def test_diffusers_command_lines_mean_the_same_here(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:  # --help prints (argparse %-formats every help text) with defaults
        T.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "(default: 1024)" in text and "tags stay in front, e.g. a trigger word " \
        "(kohya's flag). (default: 0)" in text  # a default of 0 is shown too
    assert T.parse_args(["--dataset", "x", "--snr_gamma", "5.0"]).loss_weighting == "min_snr"  # as in diffusers
    default = T.parse_args(["--dataset", "x"])
    assert (default.loss_weighting, default.snr_gamma) == ("debias", 5.0)
    with pytest.raises(T.UserError, match="--snr_gamma is min-SNR's γ, unused by --loss_weighting debias"):
        T.parse_args(["--dataset", "x", "--loss_weighting", "debias", "--snr_gamma", "3"])  # which one was meant?
    config = tmp_path / "run.yaml"  # the weighting from a config file: the error says where it is set
    config.write_text("loss_weighting: constant\n")
    with pytest.raises(T.UserError, match=r"unused by --loss_weighting constant: drop one \(--loss_weighting is "
                                          r"set in --config '.*run.yaml'\)"):
        T.parse_args(["--dataset", "x", "--config", str(config), "--snr_gamma", "3"])
    config.write_text("hub_token: hf_secret\n")  # a push would have failed later, the token silently dropped
    with pytest.raises(T.UserError, match="holds hub_token, which is never read from a file .* `hf auth login`"):
        T.parse_args(["--dataset", "x", "--config", str(config)])
    assert T.parse_args(["--dataset", "x", "--resolution", "1024,1024"]).resolution == 1024  # kohya's form
    with pytest.raises(T.UserError, match="'1024,768' is not one number.* add --aspect_ratio_bucketing"):
        T.parse_args(["--dataset", "x", "--resolution", "1024,768"])
    with pytest.raises(T.UserError, match="--use_8bit_adam.*--optimizer adamw8bit"):
        T.parse_args(["--dataset", "x", "--use_8bit_adam"])
    with pytest.raises(T.UserError, match="--bogus_flag.*--help"):
        T.parse_args(["--dataset", "x", "--bogus_flag", "1"])


HUB_STUB = """
import json, sys, types
import huggingface_hub
calls = []
def create_repo(name, exist_ok=False, token=None):
    calls.append(["create_repo", name])
    if {fail!r} == "create":
        raise OSError("401 Unauthorized")
    return types.SimpleNamespace(repo_id="someone/" + name)
def upload_folder(repo_id, folder_path, ignore_patterns=(), **kw):
    calls.append(["upload_folder", repo_id, folder_path, list(ignore_patterns)])
    if {fail!r} == "upload":
        raise OSError("503 Service Unavailable")
huggingface_hub.create_repo, huggingface_hub.upload_folder = create_repo, upload_folder
sys.path.insert(0, {root!r})
import train_sdxl_debias as T
try:
    code = T.main(sys.argv[1:])
finally:
    json.dump(calls, open({log!r}, "w"))
sys.exit(code)
"""


@pytest.mark.parametrize("fail", ["create", "upload"])  # (a success is the upload case up to its last call)
def test_push_to_hub_uploads_the_outputs_and_the_card_names_the_hub_repo(tiny_model, shapes, tmp_path, fail):
    """With --push_to_hub (the Hub's two calls stubbed: it is unreachable here) the card's usage code loads from
    the repository the outputs go to, "user/name", not from the local folder; checkpoints stay home. A Hub
    failure is one line, and the outputs, model card included, stay on disk."""
    import re
    import subprocess
    import sys

    out, log = str(tmp_path / "my-lora"), str(tmp_path / "calls.json")
    code = HUB_STUB.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), log=log, fail=fail)
    proc = subprocess.run([sys.executable, "-c", code, "--pretrained_model_name_or_path", tiny_model, "--dataset",
                           shapes, "--output_dir", out, "--resolution", "64", "--max_train_steps", "1",
                           "--checkpointing_steps", "1", "--push_to_hub"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "0"})  # the trainer refuses to push when offline
    calls = json.load(open(log))
    assert calls[0] == ["create_repo", "my-lora"]
    usage = re.search(r"```python\n(.*?)```", open(os.path.join(out, "README.md")).read(), re.S).group(1)
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    if fail == "create":
        assert len(calls) == 1 and f"pipe.load_lora_weights({out!r}, weight_name=" in usage
    else:
        assert calls[1][:3] == ["upload_folder", "someone/my-lora", out] and "checkpoint-*/**" in calls[1][3]
        assert "pipe.load_lora_weights('someone/my-lora', weight_name=" in usage
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    reason = {"create": "creating the Hub repository failed (401 Unauthorized)",
              "upload": "push to the Hub failed (503 Service Unavailable)"}[fail]
    assert proc.stderr.strip().splitlines()[-1].endswith(f"{reason}; the outputs are safe in {out}")
