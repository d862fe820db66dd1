"""End to end on the tiny fixtures: outputs load in diffusers and change the images; resume; user errors."""
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_trainer

COMMON = ["--resolution", "64", "--train_batch_size", "2", "--logging_steps", "1", "--seed", "3"]


def base_args(tiny_model, shapes, out, *extra):
    return ["--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir", out, *COMMON, *extra]


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on a blue background", num_inference_steps=3, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.fixture(scope="module")
def base_image(tiny_model):
    from diffusers import StableDiffusionXLPipeline
    return generate(StableDiffusionXLPipeline.from_pretrained(tiny_model))


def test_lora_run_outputs_load_in_diffusers_and_change_the_image(tiny_model, shapes, tmp_path, base_image):
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "lora")
    run_trainer(*base_args(tiny_model, shapes, out, "--max_train_steps", "6", "--learning_rate", "1e-2",
                           "--checkpointing_steps", "3", "--validation_prompt", "a red circle",
                           "--num_validation_images", "2", "--validation_steps", "3",
                           "--validation_inference_steps", "2"))
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000000.png", "step_000003.png",
                                                                 "step_000006.png"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["mse"]) for r in rows)
    # Readable as the umask says (safetensors alone writes owner-only files: a WebUI service could not read them).
    mask = os.umask(0)
    os.umask(mask)
    for f in ("pytorch_lora_weights.safetensors", "lora.safetensors", "checkpoint-3/pytorch_lora_weights.safetensors"):
        assert os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o666 & ~mask, f

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    trained = generate(pipe)
    assert np.abs(trained - base_image).mean() > 1e-3, "the LoRA did not change the generated image"
    # a checkpoint's folder loads the same way
    pipe.unload_lora_weights()
    pipe.load_lora_weights(os.path.join(out, "checkpoint-3"), weight_name="pytorch_lora_weights.safetensors")
    assert np.abs(generate(pipe) - base_image).mean() > 1e-4


def test_full_finetune_saves_a_pipeline_that_loads(tiny_model, shapes, tmp_path, base_image):
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "full")
    run_trainer(*base_args(tiny_model, shapes, out, "--finetune", "full", "--max_train_steps", "3",
                           "--learning_rate", "1e-3", "--loss_weighting", "min_snr",
                           "--gradient_checkpointing", "--center_crop"))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert np.abs(generate(pipe) - base_image).mean() > 1e-3, "full fine-tune did not change the image"


def lora_state(folder):
    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def rel_l1(a, b):
    num = sum((a[k].float() - b[k].float()).abs().sum() for k in a)
    return float(num / sum(a[k].float().abs().sum() for k in a))


def test_a_lora_run_trains_only_its_adapters_and_a_full_one_only_the_unet(tiny_model):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    import train_sdxl_debias as T

    for argv, unet_trains, te_trains in ((["--train_text_encoder", "--gradient_checkpointing"], "lora", "lora"),
                                         (["--finetune", "full"], "all", None)):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
        args = T.parse_args(["--dataset", "x", *argv])
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # (transformers 5 renamed gradient_checkpointing_enable)
            m = T.prepare_models(args, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                 pipe.vae, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), "cpu",
                                 torch.float32)
        if args.train_text_encoder:  # text encoder 1's last layer feeds nothing SDXL uses: no LoRA there
            last = [f"layers.{te.config.num_hidden_layers - 1}." for te in m.text_encoders]
            assert not any(last[0] in n and ".lora_" in n for n, _ in m.text_encoders[0].named_parameters())
            assert any(last[1] in n and ".lora_" in n for n, _ in m.text_encoders[1].named_parameters())
        if args.gradient_checkpointing:
            assert m.unet.is_gradient_checkpointing and all(getattr(te, "is_activation_checkpointing", None) or
                                                            te.is_gradient_checkpointing for te in m.text_encoders)
        for model, trains in ((m.unet, unet_trains), (m.text_encoders[0], te_trains), (m.text_encoders[1], te_trains),
                              (m.vae, None)):
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            if trains == "lora":
                assert names and all(".lora_" in n for n in names), (argv, type(model).__name__, names[:3])
            else:
                assert len(names) == (len(list(model.parameters())) if trains == "all" else 0), (argv, trains)


def test_the_vae_runs_in_fp32_unless_its_config_says_fp16_is_safe(tiny_model):
    # SDXL's own VAE (force_upcast, also as A1111's sdxl_vae.safetensors) overflows in fp16; the fp16-fix's
    # config clears force_upcast, and only then does the VAE take the mixed-precision dtype.
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    import train_sdxl_debias as T

    for force_upcast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
        pipe.vae.register_to_config(force_upcast=force_upcast)
        args = T.parse_args(["--dataset", "x"])
        m = T.prepare_models(args, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                             pipe.vae, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), "cpu",
                             torch.bfloat16)
        assert next(m.vae.parameters()).dtype == dtype


def test_resumed_run_equals_uninterrupted_run(tiny_model, shapes, tmp_path):
    """Mid-epoch checkpoint, accumulation, bucketing, random crop/flip, warmup + linear decay, LoRA dropout and
    validation: the resumed run must end with the weights, and log the rows, of the run that was never stopped."""
    extra = ["--max_train_steps", "8", "--gradient_accumulation_steps", "2", "--random_flip", "--aspect_ratio_bucketing",
             "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--learning_rate", "5e-3",
             "--checkpointing_steps", "3", "--noise_offset", "0.05", "--lora_dropout", "0.1", "--logging_steps", "2",
             "--validation_prompt", "a red circle", "--validation_steps", "3", "--num_validation_images", "1",
             "--validation_inference_steps", "2"]
    full_run = str(tmp_path / "uninterrupted")
    run_trainer(*base_args(tiny_model, shapes, full_run, *extra))
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full_run, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    # (--overwrite_output_dir too, as a requeued job's script may pass it every time: the resume wins, said.)
    proc = run_trainer(*base_args(tiny_model, shapes, resumed, *extra, "--resume_from_checkpoint", "latest",
                                  "--overwrite_output_dir"))
    assert "resumed from" in proc.stderr and "--overwrite_output_dir is ignored: the run continues from step 3" \
        in proc.stderr
    a, b = lora_state(full_run), lora_state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rel_l1(a, lora_state(os.path.join(full_run, "checkpoint-3"))) > 1e-2  # it did train after step 3
    rows = lambda d: [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                      for line in open(os.path.join(d, "metrics.jsonl"))]
    assert [r["step"] for r in rows(full_run)] == [2, 3, 4, 6, 8]  # a checkpoint (3, 6) ends a row too
    assert rows(resumed) == rows(full_run)[2:]  # row 4 holds step 4 alone in both runs


def test_lr_schedules_take_their_cycles_and_power(caplog):
    """--lr_num_cycles and --lr_power (diffusers' flag names; kohya's --lr_scheduler_num_cycles/_power) reach the
    schedule: without them cosine_with_restarts was plain cosine and polynomial was linear."""
    import train_sdxl_debias as T

    def curve(*flags):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = T.lr_schedule(T.parse_args(["--dataset", "x", *flags]), optimizer, 10)
        lrs = []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step(), schedule.step()
        return lrs

    restarts = curve("--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2")
    assert restarts[0] == restarts[5] == 1.0 and restarts[4] < 0.2  # decays, then starts again at the peak
    assert curve("--lr_scheduler", "cosine_with_restarts") == curve("--lr_scheduler", "cosine")  # 1 cycle: cosine
    squared = curve("--lr_scheduler", "polynomial", "--lr_power", "2")
    assert abs(squared[5] - 0.25) < 1e-3 and abs(curve("--lr_scheduler", "polynomial")[5] - 0.5) < 1e-3
    assert curve("--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2") == restarts
    with pytest.raises(T.UserError, match="--lr_num_cycles 0 must be at least 1"):
        T.validate(T.parse_args(["--dataset", "x", "--lr_num_cycles", "0"]))
    # constant with a warmup warms up (diffusers' constant ignores it), and the log says so.
    with caplog.at_level(logging.INFO, logger=T.logger.name):
        assert curve("--lr_scheduler", "constant", "--lr_warmup_steps", "2")[:3] == [0.0, 0.5, 1.0]
    assert "warming up over those steps, as constant_with_warmup" in caplog.text


def test_a_resume_with_other_optimizer_flags_uses_them_and_says_so(tiny_model, shapes, tmp_path):
    """The optimizer's saved state carries its hyperparameters: a changed --adam_weight_decay or --max_grad_norm
    takes effect and is named; a changed --learning_rate is not (the schedule is the checkpoint's), and the
    outputs record the rate the run used, not the one typed."""
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "5e-3"]
    first = str(tmp_path / "first")
    run_trainer(*base_args(tiny_model, shapes, first, *extra))
    again = str(tmp_path / "again")
    os.makedirs(again)
    shutil.copytree(os.path.join(first, "checkpoint-2"), os.path.join(again, "checkpoint-2"))
    proc = run_trainer(*base_args(tiny_model, shapes, again, *extra, "--resume_from_checkpoint", "latest",
                                  "--adam_weight_decay", "50", "--max_grad_norm", "0.5", "--learning_rate", "1",
                                  "--gradient_accumulation_steps", "2"))
    assert "--adam_weight_decay 0.01 -> 50.0" in proc.stderr and "--max_grad_norm 1.0 -> 0.5" in proc.stderr
    assert "an optimizer step now takes 4 samples instead of 2: the position in the data is counted" in proc.stderr
    assert "--learning_rate 1 is ignored" in proc.stderr
    config = json.load(open(os.path.join(again, "train_config.json")))
    assert (config["learning_rate"], config["adam_weight_decay"]) == (5e-3, 50.0)
    assert "| learning_rate | 0.005 |" in open(os.path.join(again, "README.md")).read()
    a, b = lora_state(first), lora_state(again)
    assert rel_l1(a, b) > 1e-3  # the decay took effect (the lr alone would have left b equal to a)


def test_channels_last_trains_the_same_lora_and_saves_it(tiny_model, shapes, tmp_path):
    """--channels_last only changes the memory layout: same LoRA (conv layers included, whose channels-last
    weights safetensors would refuse unless made contiguous), loadable by diffusers in both formats."""
    from diffusers import StableDiffusionXLPipeline

    extra = ["--max_train_steps", "3", "--learning_rate", "5e-3", "--lora_target_modules", "to_q,to_v,conv1,conv2"]
    nchw, nhwc = str(tmp_path / "nchw"), str(tmp_path / "nhwc")
    run_trainer(*base_args(tiny_model, shapes, nchw, *extra))
    run_trainer(*base_args(tiny_model, shapes, nhwc, *extra, "--channels_last"))
    a, b = lora_state(nchw), lora_state(nhwc)
    assert a.keys() == b.keys() and any("conv1" in k for k in a)
    assert rel_l1(a, b) < 1e-3
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(nhwc, weight_name="nhwc.safetensors")  # the kohya file


def test_txt_caption_folder_trains(tiny_model, tmp_path):
    """kohya layout: images with same-name .txt captions and no metadata file, via --train_data_dir."""
    import subprocess
    import sys
    from conftest import ROOT

    data = str(tmp_path / "kohya")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_shapes_dataset.py"), data,
                    "--num_images", "4", "--layout", "txt"], check=True, capture_output=True)
    first = sorted(f for f in os.listdir(data) if f.endswith(".txt"))[0]
    with open(os.path.join(data, first), "a") as f:
        f.write(", highly detailed" * 40)  # a captioning model's essay: cut at 77 tokens, and the log says so
    out = str(tmp_path / "out")
    proc = run_trainer("--pretrained_model_name_or_path", tiny_model, "--train_data_dir", data,
                       "--output_dir", out, *COMMON, "--max_train_steps", "2")
    assert "4 images" in proc.stderr and "1 of 5 captions are longer than the text encoders' 77 tokens" in proc.stderr
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))


USER_ERRORS = {
    "no_data": ([], "no training data"),
    "missing_dir": (["--train_data_dir", "/nonexistent/images"], "/nonexistent/images"),
    "data_file_as_a_folder": (["--train_data_dir", "{shapes}/train/metadata.jsonl"],
                              "metadata.jsonl' is not a folder: pass a data file as --dataset"),
    "unknown_hub_dataset": (["--dataset", "nobody-xyz/no-such-dataset"], "nobody-xyz/no-such-dataset"),
    "missing_column": (["--dataset", "{shapes}", "--caption_column", "prompt"], "its columns are: image, text"),
    "full_with_rank": (["--dataset", "{shapes}", "--finetune", "full", "--rank", "8"], "--rank"),
    "bad_resolution": (["--dataset", "{shapes}", "--resolution", "100"], "--resolution 100"),
    "resume_missing": (["--dataset", "{shapes}", "--resume_from_checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    "bad_model": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "/nonexistent/model"],
                  "'/nonexistent/model' does not exist"),
    "model_is_the_data_folder": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{shapes}"],
                                 "is not a diffusers pipeline folder (no model_index.json, no unet/)"),
    "model_is_a_pipeline_part": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{tiny_model}/unet/"],
                                 "is one part of a diffusers pipeline: pass the pipeline folder"),
    "model_is_an_sd15_folder": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}/sd15-pipeline"],
                                "is a StableDiffusionPipeline folder; pass an SDXL one"),
    "model_is_a_folder_of_checkpoint_files": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}"],
                                              "to train from the checkpoint file in it, pass --pretrained_model_name_or_path"),
    "output_dir_is_the_model": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{tiny_model}",
                                 "--output_dir", "{tiny_model}"], "is the base model's folder"),
    # Values torch takes without a word and trains wrongly with, or refuses only after the models have loaded.
    "negative_learning_rate": (["--dataset", "{shapes}", "--learning_rate", "-1"], "--learning_rate -1.0 must be 0"),
    "beta_of_one": (["--dataset", "{shapes}", "--adam_beta2", "1"], "--adam_beta2 1.0 must be at least 0 and below 1"),
    "random_seed_as_in_webuis": (["--dataset", "{shapes}", "--seed", "-1"], "--seed -1 must be between 0 and"),
    "zero_lora_alpha": (["--dataset", "{shapes}", "--lora_alpha", "0"], "--lora_alpha 0.0 must be above 0"),
    "zero_rank": (["--dataset", "{shapes}", "--rank", "0"], "--rank 0 must be at least 1"),  # (not its alpha's)
    "negative_clipping_norm": (["--dataset", "{shapes}", "--max_grad_norm", "-1"], "(0: no clipping)"),
    "no_denoising_steps": (["--dataset", "{shapes}", "--validation_inference_steps", "0"],
                           "--validation_inference_steps must be at least 1"),
    "token_with_tracker": (["--dataset", "{shapes}", "--hub_token", "hf_x", "--report_to", "tensorboard"],
                           "hf auth login"),
    "lora_flag_with_full": (["--dataset", "{shapes}", "--finetune", "full", "--lora_dropout", "0.1"], "--lora_dropout"),
    "ema_with_lora": (["--dataset", "{shapes}", "--use_ema"], "--use_ema"),
    "missing_config": (["--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
    "timestep_range": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{tiny_model}",
                        "--max_timestep", "2000"], "--max_timestep"),
    "misspelt_lora_target": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{tiny_model}",
                              "--lora_target_modules", "to_q, to_kk"], "to_kk matches no layer"),
    "output_dir_is_a_file": (["--dataset", "{shapes}", "--output_dir", "{shapes}/train/metadata.jsonl"], "is a file"),
    "output_dir_in_a_file": (["--dataset", "{shapes}", "--output_dir", "{shapes}/train/metadata.jsonl/out"],
                             "metadata.jsonl', a file; pass a folder"),
    "model_is_a_data_file": (["--dataset", "{shapes}", "--pretrained_model_name_or_path",
                              "{shapes}/train/metadata.jsonl"], "is a file but no model checkpoint"),
    "model_is_a_lora": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}/lora.safetensors"],
                        "is a LoRA, not a base model"),
    "model_is_sd15": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}/sd15.safetensors"],
                      "Stable Diffusion 1.x/2.x checkpoint"),
    "model_is_a_unet": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}/unet.safetensors"],
                        "one diffusers model's weights: pass the pipeline folder"),
    "model_file_cut_short": (["--dataset", "{shapes}", "--pretrained_model_name_or_path",
                              "{files}/broken.safetensors"], "is not a readable safetensors file"),
    "variant_of_a_model_file": (["--dataset", "{shapes}", "--pretrained_model_name_or_path",
                                 "{files}/tiny.safetensors", "--variant", "fp16"], "leave --variant out"),
    "model_file_offline_without_config": (["--dataset", "{shapes}", "--pretrained_model_name_or_path",
                                           "{files}/tiny.safetensors"], "pass --single_file_config"),
    "vae_file_in_diffusers_layout": (["--dataset", "{shapes}", "--pretrained_vae_model_name_or_path",
                                      "{files}/diffusion_pytorch_model.safetensors"], "pass the folder that holds it"),
    "vae_file_of_no_vae": (["--dataset", "{shapes}", "--pretrained_vae_model_name_or_path", "{files}/unet.safetensors"],
                           "holds no VAE"),
    "vae_is_a_pipeline_folder": (["--dataset", "{shapes}", "--pretrained_vae_model_name_or_path", "{tiny_model}"],
                                 "it is a pipeline folder, pass its VAE"),
    "vae_file_is_a_lora": (["--dataset", "{shapes}", "--pretrained_vae_model_name_or_path", "{files}/lora.safetensors"],
                           "is a LoRA, not a VAE"),
    "vae_file_is_sd15": (["--dataset", "{shapes}", "--pretrained_vae_model_name_or_path", "{files}/sd15.safetensors"],
                         "whose VAE is not SDXL's"),
    "single_file_config_is_a_yaml": (["--dataset", "{shapes}", "--pretrained_model_name_or_path",
                                      "{files}/tiny.safetensors", "--single_file_config", "{files}/model.sft"],
                                     "an original .yaml config is not read"),
    "network_weights_missing": (["--dataset", "{shapes}", "--network_weights", "{files}/none.safetensors"],
                                "does not exist"),
    "network_weights_not_a_lora": (["--dataset", "{shapes}", "--network_weights", "{files}/tiny.safetensors"],
                                   "holds no LoRA layers"),
    "network_weights_with_full": (["--dataset", "{shapes}", "--finetune", "full", "--network_weights",
                                   "{files}/lora.safetensors"], "--network_weights only applies to --finetune lora"),
    "model_pickle_not_sdxl": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}/sd15.ckpt",
                               "--single_file_config", "{tiny_model}"], "not a whole SDXL checkpoint"),
    "model_sft_file": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}/model.sft"],
                       "rename the file"),
    "model_file_missing": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{files}/gone.safetensors"],
                           "gone.safetensors' does not exist"),
    "model_url": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "https://x.org/m.safetensors"],
                  "is a URL: download the file"),
    "single_file_config_of_sd15": (["--dataset", "{shapes}", "--pretrained_model_name_or_path",
                                    "{files}/tiny.safetensors", "--single_file_config", "{files}/sd15-pipeline"],
                                   "is a StableDiffusionPipeline folder; pass an SDXL one"),
    "single_file_config_missing": (["--dataset", "{shapes}", "--pretrained_model_name_or_path",
                                    "{files}/tiny.safetensors", "--single_file_config", "{files}/nowhere"],
                                   "nowhere' does not exist"),
    "single_file_config_for_a_folder": (["--dataset", "{shapes}", "--single_file_config", "{tiny_model}"],
                                        "--single_file_config is for"),
    "dataset_smaller_than_a_step": (["--dataset", "{shapes}", "--train_batch_size", "64",  # checked before the
                                     "--pretrained_model_name_or_path", "nobody-xyz/no-such-model"],  # model loads
                                    "fewer than one optimizer step needs (batch 64 × accumulation 1 × 1 processes):"
                                    " lower --train_batch_size"),
    "missing_data_file": (["--dataset", "captions.jsonl"], "dataset file 'captions.jsonl' does not exist"),
    "output_dir_is_the_data": (["--dataset", "{shapes}", "--output_dir", "{shapes}"], "is the dataset folder"),
    "diffusers_only_flag": (["--dataset", "{shapes}", "--use_8bit_adam"], "--optimizer adamw8bit"),
    "single_file_with_lora": (["--dataset", "{shapes}", "--save_single_file"], "--save_single_file"),
    "te_lr_without_te": (["--dataset", "{shapes}", "--text_encoder_lr", "1e-5"], "--train_text_encoder"),
    "fp16_on_cpu": (["--dataset", "{shapes}", "--pretrained_model_name_or_path", "{tiny_model}",
                     "--mixed_precision", "fp16"], "bf16"),
}
for package, argv in (("prodigyopt", ["--optimizer", "prodigy"]), ("bitsandbytes", ["--optimizer", "adamw8bit"]),
                      ("wandb", ["--report_to", "wandb"])):
    if importlib.util.find_spec(package) is None:  # a missing optional package is named, with its install line
        USER_ERRORS[f"missing_{package}"] = (["--dataset", "{shapes}", *argv], f"pip install {package}")


def failing_run(argv, monkeypatch, capsys):
    """(exit code, stderr) of a command line that should fail: in-process through main(), the command line's own
    entry point, when the mistake is caught before training starts (a flag, a path); else in a fresh process,
    as a user runs it (what needs the data or the model)."""
    import train_sdxl_debias as T

    reached = []
    with monkeypatch.context() as patch:
        patch.setattr(T, "train", reached.append)
        code, stderr = T.main(list(map(str, argv))), capsys.readouterr().err
    if reached:
        proc = run_trainer(*argv, check=False)
        code, stderr = proc.returncode, proc.stderr
    return code, stderr


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_end_in_one_clear_line(case, shapes, tiny_model, model_files, tmp_path, monkeypatch, capsys):
    argv, needle = USER_ERRORS[case]
    code, stderr = failing_run(["--output_dir", str(tmp_path / "out"), "--resolution", "64",
                                *(a.format(shapes=shapes, tiny_model=tiny_model, files=model_files) for a in argv)],
                               monkeypatch, capsys)
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") != [".lock"]  # no litter


def test_a_rank_set_without_a_launcher_is_a_clear_error(shapes, tmp_path, monkeypatch, capsys):
    """LOCAL_RANK left in the environment (a notebook or job script), no launcher: accelerate would wait for
    peers that were never started, or fail in torch.distributed with a traceback."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code, stderr = failing_run(["--dataset", shapes, "--output_dir", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith(
        "error: LOCAL_RANK is set in the environment but WORLD_SIZE is not: launch with accelerate launch or torchrun")


def test_a_bad_data_file_is_said_once(tmp_path, monkeypatch, capsys):
    """datasets logs a file it cannot read (twice) before raising: only the error line is printed."""
    (tmp_path / "data.parquet").write_bytes(b"not a parquet file")
    code, stderr = failing_run(["--dataset", str(tmp_path / "data.parquet"), "--output_dir", str(tmp_path / "out")],
                               monkeypatch, capsys)
    said = [line for line in stderr.splitlines() if "magic bytes" in line]
    assert code == 2 and len(said) == 1 and said[0].startswith("error: cannot load dataset"), stderr[-2000:]


def test_existing_checkpoints_need_resume_or_overwrite(tiny_model, shapes, tmp_path, monkeypatch, capsys):
    """A second run is refused (the last step always leaves a checkpoint, whatever --checkpointing_steps says);
    with --overwrite_output_dir it starts afresh: none of the first run's results stays beside its own (here a
    LoRA's files and grids beside a full fine-tune's pipeline), the user's files do."""
    out = str(tmp_path / "run")
    run_trainer(*base_args(tiny_model, shapes, out, "--max_train_steps", "1", "--validation_prompt", "a circle",
                           "--num_validation_images", "1", "--validation_inference_steps", "1"))
    code, stderr = failing_run(base_args(tiny_model, shapes, out, "--max_train_steps", "1"), monkeypatch, capsys)
    assert code == 2 and "--resume_from_checkpoint latest" in stderr.splitlines()[-1]
    assert os.path.isdir(os.path.join(out, "checkpoint-1"))  # nothing lost
    assert {"pytorch_lora_weights.safetensors", "run.safetensors", "samples"} <= set(os.listdir(out))
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    run_trainer(*base_args(tiny_model, shapes, out, "--max_train_steps", "1", "--overwrite_output_dir",
                           "--finetune", "full"))
    names = set(os.listdir(out))
    assert {"model_index.json", "unet", "notes.txt", "checkpoint-1"} <= names
    assert not names & {"pytorch_lora_weights.safetensors", "run.safetensors"}
    assert os.listdir(os.path.join(out, "samples")) == []  # the first run's grids
    assert "Validation images" not in open(os.path.join(out, "README.md")).read()


def test_a_lora_peft_cannot_build_is_one_error_line():
    """A layer type peft has no LoRA for (a GroupNorm) or an init its conv LoRA lacks: the flags are named."""
    import sys
    import train_sdxl_debias as T
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import make_tiny_sdxl

    for extra in (["--lora_target_modules", "to_q,norm1"],
                  ["--lora_target_modules", "to_q,conv1", "--init_lora_weights", "orthogonal"]):
        args = T.parse_args(["--dataset", "x", *extra])
        with pytest.raises(T.UserError, match="peft cannot put this LoRA on the UNet2DConditionModel"):
            T.add_lora(UNet2DConditionModel(**make_tiny_sdxl.tiny_unet_config()), args,
                       args.lora_target_modules.split(","), False)


def test_foreign_flags_prefixes_and_bad_values_are_named_in_one_line():
    """diffusers' full-SDXL README command has three flags this trainer spells otherwise: all are named at once,
    each with its replacement. kohya's --sdpa is no prefix of --sdpa_backend; a bad value is one line too."""
    import train_sdxl_debias as T

    with pytest.raises(T.UserError) as e:
        T.parse_args(["--dataset", "x", "--enable_xformers_memory_efficient_attention", "--use_8bit_adam",
                      "--validation_epochs", "5"])
    for needle in ("unrecognized arguments: ", "'--use_8bit_adam' (use --optimizer adamw8bit)",
                   "'--validation_epochs' (use --validation_steps", "scaled-dot-product attention"):
        assert needle in str(e.value), needle
    for argv, needle in ((["--sdpa"], "'--sdpa' (always on"), (["--noise", "0.1"], "'--noise' (see --help"),
                         (["--resolution", "1024x1024"], "argument --resolution: '1024x1024' is not one number"),
                         (["--rank", "four"], "argument --rank: invalid int value")):
        with pytest.raises(T.UserError, match=re.escape(needle)):
            T.parse_args(["--dataset", "x", *argv])


def test_the_base_models_folder_takes_no_outputs_unless_it_is_an_earlier_output(tiny_model, shapes, tmp_path):
    """--output_dir = the base model's folder would overwrite the base model (a full fine-tune's weights, the model
    card): refused, unless the folder is an earlier run's output (train_config.json), continued in place. A
    pipeline folder without model_index.json (parts downloaded alone) still trains: the parts load from unet/ etc."""
    import train_sdxl_debias as T

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    argv = ["--dataset", shapes, "--pretrained_model_name_or_path", str(base), "--output_dir", str(base)]
    with pytest.raises(T.UserError, match="is the base model's folder"):
        T.validate(T.parse_args(argv))
    (base / "train_config.json").write_text("{}")
    T.validate(T.parse_args(argv))
    (base / "model_index.json").unlink()
    T.validate(T.parse_args(argv))


def test_overwrite_keeps_a_pipeline_this_run_loads(tmp_path):
    """--overwrite_output_dir where the output folder and the base model's overlap (validate refuses them equal;
    previous_results guards any overlap): the pipeline there is this run's input, not a previous result to remove."""
    import train_sdxl_debias as T

    out = tmp_path / "model"
    (out / "unet").mkdir(parents=True)
    for name in ("model_index.json", "README.md", "unet/config.json"):
        (out / name).write_text("{}")
    args = T.parse_args(["--dataset", "x", "--output_dir", str(out), "--pretrained_model_name_or_path", str(out)])
    T.remove_outputs(T.previous_results(args))
    assert sorted(os.listdir(out)) == ["README.md", "model_index.json", "unet"]
    args.pretrained_model_name_or_path = str(tmp_path / "elsewhere")
    T.remove_outputs(T.previous_results(args))  # another base model: this pipeline is a previous run's result
    assert os.listdir(out) == []


def test_a_failed_start_loses_nothing_and_a_mismatched_resume_says_why(tiny_model, shapes, tmp_path, monkeypatch,
                                                                       capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')  # left by a run killed before its first checkpoint
    run_trainer(*base_args(tiny_model, shapes, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]  # no repeat
    before = sorted(os.listdir(out)), open(os.path.join(out, "train_config.json")).read()

    def fails(*argv):
        code, stderr = failing_run(argv, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert (sorted(os.listdir(out)), open(os.path.join(out, "train_config.json")).read()) == before
        return stderr.strip().splitlines()[-1]

    # --overwrite_output_dir with a wrong caption column: checkpoints, metrics and config stay as they were.
    assert "--caption_column" in fails(*base_args(tiny_model, shapes, out, "--overwrite_output_dir",
                                                  "--caption_column", "captoin"))
    last = fails(*base_args(tiny_model, shapes, out, "--max_train_steps", "4", "--resume_from_checkpoint",
                            "checkpoint-2", "--rank", "8"))  # a name inside output_dir, as diffusers' scripts take
    assert "--rank 4 -> 8" in last and "checkpoint-2" in last
    # Going back while newer checkpoints of the run exist (they would outrank the new ones), or past the end.
    last = fails(*base_args(tiny_model, shapes, out, "--max_train_steps", "2", "--resume_from_checkpoint",
                            "checkpoint-1"))
    assert "past checkpoint-1's step 1 (checkpoint-2): --resume_from_checkpoint latest continues" in last
    last = fails(*base_args(tiny_model, shapes, out, "--resume_from_checkpoint",
                            os.path.join(out, "checkpoint-1", "trainer_state.json")))
    assert "is a file: pass its checkpoint folder" in last
    last = fails(*base_args(tiny_model, shapes, out, "--max_train_steps", "1", "--resume_from_checkpoint", "latest"))
    assert "at step 2, past this run's 1 steps" in last
    os.remove(os.path.join(out, "checkpoint-2", "optimizer.bin"))
    last = fails(*base_args(tiny_model, shapes, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    assert last.startswith("error: cannot resume from") and "checkpoint-2" in last
    assert last.endswith("move that checkpoint folder aside; then --resume_from_checkpoint latest continues from "
                         "the one before it")


def test_a_foreign_checkpoint_folder_is_moved_aside_not_deleted(tiny_model, shapes, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)  # e.g. from diffusers' script: no trainer_state.json
    (out / "checkpoint-2" / "notes.txt").write_text("mine")
    (out / "checkpoint-2.orig").mkdir()  # an earlier one already moved aside: neither is overwritten
    # `latest` cannot continue it: said, rather than a new run from step 0 over what the user meant to continue.
    import train_sdxl_debias as T
    with pytest.raises(T.UserError, match="holds checkpoint-2, not written by this trainer"):
        T.validate(T.parse_args(base_args(tiny_model, shapes, str(out), "--resume_from_checkpoint", "latest")))
    proc = run_trainer(*base_args(tiny_model, shapes, str(out), "--max_train_steps", "2", "--checkpointing_steps", "2"))
    assert (out / "checkpoint-2.orig1" / "notes.txt").read_text() == "mine" and "moved to" in proc.stderr
    assert (out / "checkpoint-2" / "trainer_state.json").exists()


OLDER_TRAINER = """
import sys
sys.path.insert(0, {root!r})
import train_sdxl_debias as T
T.text_encoder_lora_targets = lambda te, pooled: list(T.TEXT_ENCODER_LORA_TARGETS)  # every layer, as before
sys.exit(T.main(sys.argv[1:]))
"""


def test_a_text_encoder_checkpoint_of_an_older_trainer_resumes(tiny_model, shapes, tmp_path):
    """Before 2026-11-27 text encoder 1's last layer had a LoRA too: a run resumed from such a checkpoint takes
    its layers (it was refused, as if the flags differed)."""
    out = str(tmp_path / "old")
    argv = base_args(tiny_model, shapes, out, "--train_text_encoder", "--checkpointing_steps", "2")
    old = subprocess.run([sys.executable, "-c", OLDER_TRAINER.format(root=ROOT), *argv, "--max_train_steps", "2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert old.returncode == 0, old.stderr[-3000:]
    layers = lambda: {k.split(".self_attn")[0] for k in lora_state(out) if k.startswith("text_encoder.")}
    before = layers()
    proc = run_trainer(*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr and layers() == before and len(before) == 3  # all 3 of the tiny encoder


def test_deepspeed_runs_without_accumulation_rather_than_stepping_wrongly():
    """accelerate steps DeepSpeed's engine at every backward outside `accelerator.accumulate`: a count above 1 in
    the DeepSpeed config silently trained at 1/N of the loss, one optimizer step per micro-batch."""
    import train_sdxl_debias as T
    args = T.parse_args(["--dataset", "x"])
    for value in ("auto", 1):
        T.check_deepspeed_accumulation(args, {"gradient_accumulation_steps": value})
    T.check_deepspeed_accumulation(args, {})
    with pytest.raises(T.UserError, match="the DeepSpeed config's gradient_accumulation_steps 4\\): set both to 1"):
        T.check_deepspeed_accumulation(args, {"gradient_accumulation_steps": 4})
    args = T.parse_args(["--dataset", "x", "--gradient_accumulation_steps", "2"])
    with pytest.raises(T.UserError, match="not supported with DeepSpeed yet \\(--gradient_accumulation_steps 2"):
        T.check_deepspeed_accumulation(args, {"gradient_accumulation_steps": "auto"})


def test_a_checkpoint_named_bare_is_output_dirs_even_beside_one_in_the_working_folder(tiny_model, shapes, tmp_path,
                                                                                       monkeypatch):
    """diffusers' scripts take `--resume_from_checkpoint checkpoint-N` from output_dir: a folder of that name in
    the working directory (another run's, started from there) must not be resumed instead."""
    import train_sdxl_debias as T
    for run in ("mine", "."):  # output_dir "mine", and a decoy run's checkpoint-3 in the working folder
        ckpt = tmp_path / run / "checkpoint-3"
        ckpt.mkdir(parents=True)
        (ckpt / T.STATE_FILE).write_text(json.dumps({"global_step": 3, "lr_scheduler": {}}))
    monkeypatch.chdir(tmp_path)
    for name in ("checkpoint-3", "checkpoint-3/"):  # (with the slash, messages named "'s step 3")
        args = T.parse_args(base_args(tiny_model, shapes, "mine", "--resume_from_checkpoint", name))
        T.validate(args)
        assert args.resume_from_checkpoint == os.path.join("mine", "checkpoint-3")
    args = T.parse_args(base_args(tiny_model, shapes, "mine", "--resume_from_checkpoint", "./checkpoint-3"))
    T.validate(args)  # a path, not a bare name: the one it names
    assert args.resume_from_checkpoint == "checkpoint-3"


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6 has no compile stances")
def test_validation_runs_compiled_blocks_eagerly_instead_of_compiling_them_again():
    """--compile compiles the blocks for training's shapes; validation (no grad, classifier-free guidance's
    doubled batch) runs them eagerly instead of stalling the run to compile again. Dynamo's eager backend
    stands in for inductor: it traces the same graphs without the code generation."""
    import argparse
    import sys
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import make_tiny_sdxl
    import train_sdxl_debias as T

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**make_tiny_sdxl.tiny_unet_config())
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim

    def forward(batch, grad):
        with torch.set_grad_enabled(grad):
            return unet(torch.randn(batch, 4, 8, 8), torch.tensor([500] * batch),
                        torch.randn(batch, 77, cfg.cross_attention_dim),
                        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled),
                                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}).sample

    torch._dynamo.reset()
    counters.clear()
    try:
        T.compile_blocks(unet, backend="eager")
        forward(1, grad=True)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        with T.eager_inference(argparse.Namespace(compile=True)):
            forward(2, grad=False)
        assert counters["stats"]["unique_graphs"] == graphs
        forward(2, grad=False)  # without the stance, the same call compiles new graphs
        assert counters["stats"]["unique_graphs"] > graphs
    finally:
        torch._dynamo.reset()


def test_max_grad_norm_zero_means_no_clipping(tiny_model, shapes, tmp_path):
    """--max_grad_norm 0 is kohya's "no clipping". Handed to torch as a norm of 0 it scaled every gradient to
    zero: the run ended normally and the LoRA had not moved."""
    weights = {}
    for norm in ("0", "1e9"):
        out = str(tmp_path / norm)
        run_trainer(*base_args(tiny_model, shapes, out, "--max_train_steps", "2", "--learning_rate", "1e-2",
                               "--max_grad_norm", norm))
        weights[norm] = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in weights["0"].items() if "lora_B" in k)
    for key, value in weights["1e9"].items():
        torch.testing.assert_close(weights["0"][key], value, rtol=0, atol=0)


def test_gradient_checkpointing_under_compile_recomputes_inside_the_graphs_with_every_scope(tmp_path, caplog):
    """CUDA graphs (reduce-overhead) fail when checkpointing, called from outside a compiled region, runs that
    region again in the backward pass to recompute it (an H100 run with diffusers' own checkpointing and
    --compile_scope blocks ended in "graph recording observed an input tensor deallocate", pytorch issue 154306).
    So with --compile every checkpoint sits inside a compiled region: no compiled graph is called during backward
    (a counting backend stands in for inductor), the gradients are those of the eager checkpointed UNet, and the
    graphs keep what checkpointing saves: with aot_eager (inductor's graph partitioning, without code generation)
    a step saves under half the bytes for backward that the eager UNet saves without checkpointing."""
    import sys
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import make_tiny_sdxl
    import train_sdxl_debias as T

    calls, saved = [], []

    def counting_backend(gm, example_inputs):
        def run(*inputs):
            calls.append(torch.is_grad_enabled())
            return gm.forward(*inputs)
        return run

    def saving(t):
        saved.append(t.numel() * t.element_size())
        return t

    def step(scope, checkpointing, backend=counting_backend):
        """(compiled calls in backward, bytes saved for backward, gradients) of one step, after a warm-up."""
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**make_tiny_sdxl.tiny_unet_config())
        if checkpointing:
            unet.enable_gradient_checkpointing()
        cfg = unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        g = torch.Generator().manual_seed(1)
        inputs = (torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]),
                  torch.randn(1, 77, cfg.cross_attention_dim, generator=g))
        cond = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        torch._dynamo.reset()
        try:
            if scope:
                T.compile_blocks(unet, backend=backend, scope=scope)
                unet(*inputs, added_cond_kwargs=cond)  # compiles
            calls.clear(), saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(saving, lambda t: t):
                out = unet(*inputs, added_cond_kwargs=cond).sample
            forward_calls = len(calls)
            assert forward_calls > 0 or backend is not counting_backend or not scope, scope
            out.square().mean().backward()
            return len(calls) - forward_calls, sum(saved), torch.cat([p.grad.flatten() for p in unet.parameters()])
        finally:
            torch._dynamo.reset()

    reference, uncheckpointed = step(None, True)[2], step(None, False)[1]
    assert all(step(scope, True)[0] == 0 for scope in ("blocks", "transformers", "stages"))
    # transformers holds both cases: resnets compiled whole, transformer blocks checkpointed inside a larger graph
    _, saved_bytes, grads = step("transformers", True, "aot_eager")
    torch.testing.assert_close(grads, reference, rtol=1e-5, atol=1e-7)
    assert saved_bytes < 0.5 * uncheckpointed, (saved_bytes, uncheckpointed)

    from diffusers import DDPMScheduler  # the flag reaches compile_blocks (module.compile is lazy: nothing compiles)
    unet = UNet2DConditionModel(**make_tiny_sdxl.tiny_unet_config())
    m = T.prepare_models(T.parse_args(["--dataset", "x", "--compile", "--compile_scope", "stages"]), [], [], None,
                         unet, DDPMScheduler(), "cpu", torch.float32)
    compiled = [n for n, mod in m.unet.named_modules() if getattr(mod, "_compiled_call_impl", None)]
    assert len(compiled) == len([*unet.down_blocks, unet.mid_block, *unet.up_blocks]), compiled
    for scope, warned in (("transformers", False), ("blocks", True)):  # only the first has run on a GPU
        with caplog.at_level("WARNING", logger=T.logger.name):
            caplog.clear()
            T.prepare_models(T.parse_args(["--dataset", "x", "--compile", "--compile_mode", "reduce-overhead",
                                           "--gradient_checkpointing", "--compile_scope", scope]), [], [], None,
                             UNet2DConditionModel(**make_tiny_sdxl.tiny_unet_config()), DDPMScheduler(), "cpu",
                             torch.float32)
        assert ("has run on a GPU with --compile_scope transformers only" in caplog.text) == warned, caplog.text

    data = ["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    for scope in ("blocks", "transformers", "stages"):  # CUDA graphs with checkpointing: any scope
        T.validate(T.parse_args([*data, "--compile", "--compile_mode", "reduce-overhead", "--gradient_checkpointing",
                                 "--compile_scope", scope]))
    with pytest.raises(T.UserError, match="--compile_scope needs --compile"):
        T.validate(T.parse_args([*data, "--compile_scope", "stages"]))


def test_a_compiled_run_saves_the_same_lora_as_an_eager_run(tiny_model, shapes, tmp_path):
    """--compile end to end: training, validation and saving through the compiled blocks give the LoRA an eager
    run gives (same keys, no `_orig_mod.` prefixes, same values). Dynamo's eager backend stands in for inductor,
    whose code generation alone would take minutes on this CPU."""
    import subprocess
    import sys

    outputs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = str(tmp_path / name)
        launcher = ("import functools, sys, train_sdxl_debias as T; "
                    "T.compile_blocks = functools.partial(T.compile_blocks, backend='eager'); "
                    "sys.exit(T.main(sys.argv[1:]))")
        proc = subprocess.run(
            [sys.executable, "-c", launcher, *base_args(tiny_model, shapes, out, "--max_train_steps", "3",
                                                        "--learning_rate", "1e-2", "--validation_prompt", "a circle",
                                                        "--validation_steps", "3", "--validation_inference_steps", "2",
                                                        "--num_validation_images", "1", *extra)],
            capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env=os.environ.copy())
        assert proc.returncode == 0, proc.stderr[-4000:]
        outputs[name] = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
        assert os.path.exists(os.path.join(out, "samples", "step_000003.png"))
    eager, compiled = outputs["eager"], outputs["compiled"]
    assert sorted(compiled) == sorted(eager) and not any("_orig_mod" in k for k in compiled)
    trained = [v for k, v in eager.items() if "lora_B" in k or "lora.up" in k]  # zero at initialisation
    assert trained and any(v.abs().max() > 0 for v in trained)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6)


def test_cuda_graphs_with_validation_are_refused_on_a_torch_without_compile_stances(monkeypatch, tmp_path):
    """Validation can only keep CUDA graphs out of its denoising loop with torch >= 2.6's stances."""
    import train_sdxl_debias as T

    (tmp_path / "a.png").write_bytes(b"")
    argv = ["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--compile",
            "--compile_mode", "reduce-overhead", "--validation_prompt", "a cat"]
    monkeypatch.delattr(torch.compiler, "set_stance", raising=False)
    with pytest.raises(T.UserError, match="reduce-overhead with --validation_prompt needs torch 2.6"):
        T.validate(T.parse_args(argv))
    T.validate(T.parse_args(argv[:-2]))  # without validation: fine
