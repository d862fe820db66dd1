"""Runs killed mid-checkpoint, non-finite losses, and several processes."""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import signal
import time
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_sdxl_debias as T
from conftest import ROOT, run_trainer

TRAINER = os.path.join(ROOT, "train_sdxl_debias.py")


def args_for(tiny_model, shapes, out, *extra):
    return ["--pretrained_model_name_or_path", tiny_model, "--dataset", shapes, "--output_dir", out,
            "--resolution", "64", "--train_batch_size", "2", "--logging_steps", "1", "--seed", "1", *extra]


def checkpoints(out):
    return sorted((n for n in os.listdir(out) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def metrics_steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_sigkill_while_checkpointing_then_resume_latest(tiny_model, shapes, tmp_path):
    out = str(tmp_path / "run")
    argv = args_for(tiny_model, shapes, out, "--max_train_steps", "24", "--checkpointing_steps", "1",
                    "--checkpoints_total_limit", "3")
    proc = subprocess.Popen([sys.executable, TRAINER, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    # Kill it while a checkpoint is being written: the moment a temporary checkpoint folder exists after step 3.
    deadline, killed_during = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(out) if os.path.isdir(out) else []
        tmp = [n for n in names if n.startswith(".tmp-checkpoint-") and int(n.rsplit("-", 1)[1]) >= 4]
        if tmp:
            proc.kill()
            killed_during = tmp[0]
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_during, "the run ended before it could be killed mid-checkpoint"
    done = checkpoints(out)
    assert done, "no complete checkpoint survived"
    for name in done:  # every checkpoint-N is complete
        for f in ("trainer_state.json", "pytorch_lora_weights.safetensors", "optimizer.bin"):
            assert os.path.exists(os.path.join(out, name, f)), (name, f, killed_during)
    # A folder the run did not create must survive pruning and never be taken for a checkpoint.
    os.makedirs(os.path.join(out, "checkpoint-999"))
    open(os.path.join(out, "checkpoint-999", "mine.txt"), "w").write("user data")
    proc = run_trainer(*argv, "--resume_from_checkpoint", "latest")
    assert f"resumed from {os.path.join(out, done[-1])}" in proc.stderr
    assert os.path.exists(os.path.join(out, "checkpoint-999", "mine.txt"))
    assert checkpoints(out)[-3:-1] == ["checkpoint-23", "checkpoint-24"] and len(checkpoints(out)) == 4
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    assert metrics_steps(out) == list(range(1, 25))  # no duplicated rows from the killed run
    weights = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # An auto-resume script that runs it once more: nothing left to train, the result stays as it is. Had the
    # run been killed after its last checkpoint, before pruning the oldest (left here: checkpoint-21) and drawing
    # its final validation grid, this run does both.
    shutil.copytree(os.path.join(out, "checkpoint-22"), os.path.join(out, "checkpoint-21"))
    run_trainer(*argv, "--resume_from_checkpoint", "latest", "--validation_prompt", "a red circle",
                "--num_validation_images", "1", "--validation_inference_steps", "1")
    assert metrics_steps(out) == list(range(1, 25))
    again = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    assert checkpoints(out)[:3] == ["checkpoint-22", "checkpoint-23", "checkpoint-24"]
    assert os.listdir(os.path.join(out, "samples")) == ["step_000024.png"]


def test_an_interruption_before_the_first_checkpoint_says_nothing_can_be_resumed(tiny_model, shapes, tmp_path,
                                                                                   monkeypatch, capsys):
    """Ctrl-C before the first checkpoint leaves nothing for `latest` to continue: the message says so rather
    than promise a resume that would start from step 0."""
    import train_sdxl_debias as T

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", stopped)
    out = tmp_path / "run"
    assert T.main(args_for(tiny_model, shapes, str(out))) == 128 + signal.SIGINT
    assert "interrupted before the first checkpoint (--checkpointing_steps): nothing to resume" in \
        capsys.readouterr().err
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / T.STATE_FILE).write_text('{"global_step": 2, "lr_scheduler": {}}')
    assert T.main(args_for(tiny_model, shapes, str(out), "--resume_from_checkpoint", "latest")) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == "interrupted: rerun with --resume_from_checkpoint latest to continue"
    # A new run over it (--overwrite_output_dir) stopped while starting: those checkpoints are the previous run's,
    # which `latest` would continue; the same command starts afresh.
    assert T.main(args_for(tiny_model, shapes, str(out), "--overwrite_output_dir")) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == ("interrupted before it began, the previous run's results untouched: "
                                               "rerun the same command to start afresh")
    # ...but stopped while it removes them (rmtree of real checkpoints takes seconds): some are gone, and it says so.
    monkeypatch.setattr(T, "removing", False)
    monkeypatch.setattr(T, "remove_checkpoint", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    args = T.parse_args(args_for(tiny_model, shapes, str(out), "--overwrite_output_dir"))
    main_process = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(KeyboardInterrupt):
        T.claim_output_dir(args, main_process, 0)
    assert T.report(KeyboardInterrupt(), args) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == ("interrupted while --overwrite_output_dir was removing the previous "
                                               "run's results (some are gone): rerun the same command to start afresh")
    # (Results without checkpoints: the same.)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    results = T.parse_args(args_for(tiny_model, shapes, str(tmp_path / "results"), "--overwrite_output_dir"))
    monkeypatch.setattr(T, "removing", False)
    monkeypatch.setattr(T, "remove_outputs", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        T.claim_output_dir(results, main_process, 0)
    assert "(some are gone)" in T.resume_hint(results)
    # Resumed from a checkpoint elsewhere and stopped before a new one: the same command continues.
    again = tmp_path / "again"
    assert T.main(args_for(tiny_model, shapes, str(again), "--resume_from_checkpoint",
                           str(out / "checkpoint-2"))) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == ("interrupted before a new checkpoint: rerun the same command to "
                                               f"continue from {out / 'checkpoint-2'}")


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """Importing torch takes seconds on a cold disk, the moment a user notices a typo and presses Ctrl-C. A fake
    torch package that raises KeyboardInterrupt on import stands in for that moment, deterministically."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    run = subprocess.run([sys.executable, TRAINER, "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 128 + signal.SIGINT and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip() == "interrupted while loading torch: nothing had started"


STOP_WHILE_ENDING = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_sdxl_debias as T
signal.signal(signal.SIGTERM, T.on_stop)
T.forget_output_dir = lambda args: os.kill(os.getpid(), signal.SIGTERM)  # right after the error line
sys.exit(T.main(["--dataset", "x", "--use_8bit_adam"]))
"""


def test_a_stop_request_while_the_run_ends_adds_no_traceback(tmp_path):
    """torchrun signals every process again when one has failed, while the others are printing their error or
    exiting: that second request used to raise inside the error's handler and print a traceback under it."""
    run = subprocess.run([sys.executable, "-c", STOP_WHILE_ENDING.format(root=ROOT)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: unrecognized argument: '--use_8bit_adam'")
    assert "\n" not in run.stderr.strip(), run.stderr[-2000:]
    rank1 = subprocess.run([sys.executable, "-c", STOP_WHILE_ENDING.format(root=ROOT)], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path, env={**os.environ, "LOCAL_RANK": "1"})
    assert rank1.returncode == 2 and rank1.stderr == ""  # the machine's first process says it, once


def test_a_loader_worker_says_nothing_when_the_trainer_hangs_up_on_it(capsys):
    """Stopping the workers mid-transfer made a worker's shared-memory thread print a traceback under the run's
    last line (seen once in CI, after SIGTERM); real errors still print."""
    for quiet in (EOFError(), ConnectionResetError(104, "Connection reset by peer")):  # (a worker's sys.excepthook)
        T.quiet_hang_ups(type(quiet), quiet, None)
    assert capsys.readouterr().err == ""
    T.quiet_hang_ups(ValueError, ValueError("a bug"), None)
    assert "ValueError: a bug" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_a_stop_request_ends_in_one_line_and_latest_continues(tiny_model, shapes, tmp_path, sig):
    """Ctrl-C in a terminal sends SIGINT to the whole process group (loader workers included); a scheduler
    (SLURM, Kubernetes) or torchrun stops a run with SIGTERM."""

    out = str(tmp_path / "run")
    argv = args_for(tiny_model, shapes, out, "--max_train_steps", "400", "--checkpointing_steps", "2",
                    "--dataloader_num_workers", "1")
    # SIGINT's default action restored: a suite started in the background (nohup, &) passes it on ignored.
    proc = subprocess.Popen([sys.executable, TRAINER, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (os.path.isdir(out) and checkpoints(out)):
            time.sleep(0.2)
        os.killpg(proc.pid, getattr(signal, sig))
        _, stderr = proc.communicate(timeout=120)
    finally:  # a failed assertion must not leave a 400-step run taking the CPUs from the rest of the suite
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + getattr(signal, sig) and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: rerun with --resume_from_checkpoint latest")
    if sig == "SIGTERM":  # what follows is the same for both
        return
    end = int(checkpoints(out)[-1].split("-")[1]) + 2
    resumed = run_trainer(*args_for(tiny_model, shapes, out, "--max_train_steps", str(end), "--resume_from_checkpoint",
                                    "latest", "--loss_weighting", "min_snr"))
    assert "resumed from" in resumed.stderr and metrics_steps(out)[-1] == end
    # A changed objective is allowed but said: half a LoRA trained on another loss is not what the card describes.
    assert "--loss_weighting 'debias' -> 'min_snr'" in resumed.stderr and "--max_train_steps" in resumed.stderr


NAN_INJECTOR = """
import sys
sys.path.insert(0, {root!r})
import train_sdxl_debias as T
bad, real, calls = {bad!r}, T.training_step, [0]
def training_step(batch, m, args, generator, **kw):
    loss, stats = real(batch, m, args, generator, **kw)
    calls[0] += 1
    if calls[0] in bad:  # a micro-batch whose loss is NaN, as a diverging run or a bad sample gives
        loss, stats["loss"] = loss * float("nan"), stats["loss"] * float("nan")
    return loss, stats
T.training_step = training_step
sys.exit(T.main(sys.argv[1:]))
"""


def run_with_nans(bad_calls, argv):
    code = NAN_INJECTOR.format(root=ROOT, bad=set(bad_calls))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tiny_model, shapes, tmp_path):
    out = str(tmp_path / "one_nan")
    proc = run_with_nans({3}, args_for(tiny_model, shapes, out, "--max_train_steps", "5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss" in proc.stderr and "update skipped (1 in a row)" in proc.stderr
    # Strict JSON (no NaN, which JavaScript's parser refuses); the skipped step's row is null, not a dip to 0.
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] is None for r in rows] == [False, False, True, False, False]
    assert rows[2]["mse"] is None and rows[2]["grad_norm"] is None and rows[2]["samples_per_s"] is None
    weights = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_steps_in_a_row_stop_the_run_with_checkpoint_intact(tiny_model, shapes, tmp_path):
    out = str(tmp_path / "diverged")
    proc = run_with_nans(set(range(5, 1000)), args_for(tiny_model, shapes, out, "--max_train_steps", "10",
                                                       "--checkpointing_steps", "4", "--max_nonfinite_steps", "3"))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "3 steps in a row" in last and "checkpoint-4" in last, last
    weights = load_file(os.path.join(out, "checkpoint-4", "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


class OneProcess:
    """What NonFiniteGuard asks of the Accelerator, for one CPU process in bf16/fp32."""
    device, mixed_precision, scaler = torch.device("cpu"), "no", None

    def reduce(self, tensor, reduction):
        return tensor


def guarded_steps(optimizer_name, use_ema, grads, tmp_path):
    """Steps of one weight through T.NonFiniteGuard with the given gradients (a NaN marks a diverged step).
    Returns the guard, the weight after each step, and the metrics the steps left."""
    w = torch.nn.Parameter(torch.ones(3))
    args = argparse.Namespace(use_ema=use_ema, max_nonfinite_steps=2, output_dir=str(tmp_path), optimizer=optimizer_name,
                              adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=0.0)
    optimizer = T.build_optimizer(args, [{"params": [w], "lr": 0.1}], torch.device("cpu"))
    guard, metrics = T.NonFiniteGuard(args, OneProcess(), optimizer), T.MetricsLog(os.devnull, 1000)
    after = []
    for step, g in enumerate(grads):
        w.grad = torch.full((3,), g)
        metrics.add({"loss": torch.tensor([g]), "mse": torch.tensor([1.0]), "timesteps": torch.tensor([500])})
        guard.step(optimizer.step, torch.linalg.vector_norm(w.grad), metrics, step)
        after.append(w.detach().clone())
    return guard, after, metrics


@pytest.mark.parametrize("optimizer_name,use_ema,on_device", [("adamw", False, True), ("adamw", True, False),
                                                               ("adafactor", False, False)])
def test_nonfinite_guard_skips_the_update_and_counts_it(optimizer_name, use_ema, on_device, tmp_path, caplog):
    nan = float("nan")
    guard, after, metrics = guarded_steps(optimizer_name, use_ema, [1.0, nan, 1.0], tmp_path)
    assert guard.on_device == on_device  # torch's AdamW decides on the device: no host sync in the step
    assert not torch.equal(after[0], torch.ones(3))  # a finite step updates
    assert torch.equal(after[1], after[0])  # the NaN step leaves the weight (and moments) as they were
    assert torch.isfinite(after[2]).all() and not torch.equal(after[2], after[1])  # and training goes on
    guard.settle()
    assert "step 2: non-finite loss" in caplog.text and guard.in_a_row == 0
    assert metrics.totals["n"].sum() == 2 and torch.isfinite(metrics.totals["loss"]).all()  # NaN step not logged
    # Two NaN steps in a row stop the run: on the host path at once, on the device path when the verdict is read.
    with pytest.raises(T.TrainingStopped, match="NaN/Inf for 2 steps in a row"):
        guard, _, _ = guarded_steps(optimizer_name, use_ema, [nan, nan], tmp_path)
        guard.settle()


def torchrun(*argv, check=True, env=None):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1") if env is None else env
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           TRAINER, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def test_two_processes_name_every_skipped_file_once(tiny_model, tmp_path):
    """Each process decodes its own share of the images: the closing list gathers every process's skipped files
    (it listed each one's own, once per process), and the job-wide warnings of the header scan come once."""
    from test_data import make_messy_folder
    folder = make_messy_folder(str(tmp_path / "messy"))
    proc = torchrun("--pretrained_model_name_or_path", tiny_model, "--dataset", folder, "--caption_column", "captions",
                    "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--num_train_epochs", "1",
                    "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "1")
    closing = [line for line in proc.stderr.splitlines() if "unreadable image(s) in all" in line]
    truncated = os.path.join(folder, "truncated.jpg")  # decoded by process 1 at this seed, which says so itself
    assert proc.stderr.count("skipping unreadable image " + truncated) == 1, proc.stderr[-3000:]
    assert len(closing) == 1 and closing[0].endswith("in all: " + truncated), proc.stderr[-3000:]  # and listed once
    assert sum("corrupt.png" in line for line in proc.stderr.splitlines()) == 1  # the scan's, by the main process


def test_two_processes_refused_at_the_start_say_why_once(tiny_model, shapes, tmp_path):
    """A refusal only the main process can find (the output folder is locked by a live run) stops every
    process alike, in one line (the other used to add 'another process of this run stopped ... rerun'); and
    processes that never joined one group (torchrun on a CPU without ACCELERATE_USE_CPU) are refused, not left
    to train one copy each, into one folder."""
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = torchrun(*args_for(tiny_model, shapes, str(out)), check=False)
    said = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(said) == 1 and "another run is training in" in said[0], proc.stderr[-3000:]
    alone = torchrun(*args_for(tiny_model, shapes, str(tmp_path / "alone")), check=False,
                     env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"})
    said = [line for line in alone.stderr.splitlines() if line.startswith("error:")]
    assert alone.returncode != 0 and said == [
        "error: launched as 2 processes, but they did not join one group (each runs alone on cpu): on a machine "
        "without GPUs set ACCELERATE_USE_CPU=1 for torchrun, or use accelerate launch --cpu"], alone.stderr[-3000:]
    assert not os.path.exists(tmp_path / "alone")


def lora(out):
    return load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_two_processes_train_resume_and_keep_the_lr_schedule(tiny_model, shapes, tmp_path):
    # Text-encoder LoRA too: none on text encoder 1's last layer, which gets no gradient (DDP would wait for it).
    extra = ["--max_train_steps", "6", "--lr_scheduler", "linear", "--lr_warmup_steps", "2",
             "--learning_rate", "5e-3", "--checkpointing_steps", "3", "--random_flip", "--train_text_encoder"]
    two = str(tmp_path / "two")
    proc = torchrun(*args_for(tiny_model, shapes, two, *extra))
    assert "2 processes" in proc.stderr and "find_unused_parameters=True" not in proc.stderr  # (no search either)
    rows = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # only the main process writes
    # The LR schedule counts optimizer steps: the same with 1 process and accumulation 2.
    one = str(tmp_path / "one")
    run_trainer(*args_for(tiny_model, shapes, one, *extra, "--gradient_accumulation_steps", "2"))
    lrs_one = [json.loads(line)["lr"] for line in open(os.path.join(one, "metrics.jsonl"))]
    assert [r["lr"] for r in rows] == pytest.approx(lrs_one)
    assert lrs_one[0] == 0 and lrs_one[2] == pytest.approx(5e-3)  # 2 warmup steps, then decay
    # Resume with two processes from the step-3 checkpoint: the same final weights.
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(two, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    torchrun(*args_for(tiny_model, shapes, resumed, *extra, "--resume_from_checkpoint", "latest"))
    a, b = lora(two), lora(resumed)
    diff = sum((a[k] - b[k]).abs().sum() for k in a) / sum(a[k].abs().sum() for k in a)
    assert diff < 1e-3


def test_a_resume_with_more_steps_continues_on_the_new_schedule():
    from diffusers.optimization import get_scheduler

    def schedule(total):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, get_scheduler("cosine", optimizer=opt, num_warmup_steps=0, num_training_steps=total)

    opt, finished = schedule(20)
    for _ in range(20):
        opt.step()
        finished.step()
    assert opt.param_groups[0]["lr"] == 0.0  # the end of the cosine: what the checkpoint's optimizer holds
    opt, longer = schedule(30)
    opt.param_groups[0]["lr"] = 0.0
    T.restore_schedule(longer, finished.state_dict())
    expected = 1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 20 / 30))).item()
    assert opt.param_groups[0]["lr"] == pytest.approx(expected) and longer.get_last_lr()[0] == pytest.approx(expected)


def test_damaged_state_files_are_named_or_recomputed(tmp_path, caplog):
    cache = T.TensorCache(str(tmp_path / "cache"), "latents")
    cache.write({"k1": {"latents": torch.ones(4)}}, "r0")
    shard = next(p for p in os.listdir(tmp_path / "cache") if p.endswith(".safetensors"))
    with open(tmp_path / "cache" / shard, "r+b") as f:
        f.truncate(50)  # a full disk or a copy cut short
    for name, age in (("latents-r1-1-1.safetensors.tmp", 2 * 3600), ("latents-r1-2-2.safetensors.tmp", 60)):
        (tmp_path / "cache" / name).write_bytes(b"half a shard")  # a killed build's, and one being written now
        os.utime(tmp_path / "cache" / name, (time.time() - age, time.time() - age))
    again = T.TensorCache(str(tmp_path / "cache"), "latents")
    assert "k1" not in again and "is damaged" in caplog.text and not os.path.exists(tmp_path / "cache" / shard)
    assert os.listdir(tmp_path / "cache") == ["latents-r1-2-2.safetensors.tmp"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"step": 3, "lo')  # killed mid-write
    T.truncate_metrics(str(metrics), 5)
    assert metrics.read_text() == '{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n'
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / T.STATE_FILE).write_text('{"global_step": ')
    with pytest.raises(T.UserError, match="cannot read .*trainer_state.json"):
        T.read_state(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / T.STATE_FILE).write_text('{"step": 3}')  # JSON, but not a state of ours
    with pytest.raises(T.UserError, match="trainer_state.json \\(no global_step or lr_scheduler\\)"):
        T.read_state(str(tmp_path / "ckpt"))
    T.check_random_state(str(tmp_path / "ckpt"), 0)  # no random_states_0.pkl
    assert "cannot restore the random state" in caplog.text
    caplog.clear()  # accelerate's own contents read back; a crafted pickle does not run its code
    torch.save({"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, tmp_path / "ckpt" / "random_states_0.pkl")
    T.check_random_state(str(tmp_path / "ckpt"), 0)
    assert "cannot restore" not in caplog.text
    torch.save(RunsCode(str(tmp_path / "pwned")), tmp_path / "ckpt" / "random_states_0.pkl")
    T.check_random_state(str(tmp_path / "ckpt"), 0)
    assert not os.path.exists(tmp_path / "pwned") and "cannot restore the random state" in caplog.text


class RunsCode:
    """A pickle that creates a file when loaded with pickle's code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_lora_checkpoints_of_both_key_styles_load_back(tmp_path):
    """This version saves peft's names; earlier ones saved diffusers' names for attention layers and peft's for
    the rest (a conv target): a resume must read both."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import benchmark
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    opts = benchmark.parse_options(["--device", "cpu", "--lora_target_modules", "to_q,to_k,conv1"])
    cfg = benchmark.configurations(opts)[0]
    args = benchmark.trainer_args(cfg, opts)
    fresh = lambda: benchmark.prepare_models(benchmark.build_parts(cfg, opts.device, 0), args, opts.device,
                                             torch.float32).unet
    trained = fresh()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_()
    want = get_peft_model_state_dict(trained)
    old = convert_state_dict_to_diffusers(want)
    assert any(".lora.down." in k for k in old) and any(".lora_A." in k for k in old)  # the two styles
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path / "old"), unet_lora_layers=old)
    # Saved as a checkpoint of a base model whose scheduler is v-prediction (no --prediction_type given).
    T.export_trained(argparse.Namespace(**{**vars(args), "output_dir": str(tmp_path / "x")}), str(tmp_path), trained,
                     step=7, prediction_type="v_prediction")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "x-step00000007.safetensors"), "pt") as f:  # kohya's flag for v-models
        assert f.metadata()["ss_v_parameterization"] == "True"
    for folder in (tmp_path / "old", tmp_path):
        unet = fresh()
        T.load_trained(args, str(folder), unet)
        got = get_peft_model_state_dict(unet)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), folder


def test_a_cache_dir_holding_the_old_latent_cache_is_named(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "latents-r0-1-2.safetensors").write_bytes(b"")
    args = T.parse_args(["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--cache_dir",
                         str(tmp_path / "cache")])
    with pytest.raises(T.UserError, match="now --data_cache_dir"):
        T.validate(args)
    args.data_cache_dir = args.cache_dir  # the same folder for both, on purpose: fine
    T.validate(args)


def test_a_kill_while_a_checkpoint_is_replaced_leaves_one_to_resume(tmp_path, monkeypatch):
    """A resumed run that saves the step of an existing checkpoint replaces it. Killed between setting the old
    one aside and renaming the new one in, the next start puts the old one back; a kill after that keeps the
    new one. Half-written folders go, other files stay."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    out = str(tmp_path / "out")
    os.makedirs(out)
    args = T.parse_args(["--dataset", "x", "--output_dir", out])
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler("constant", optimizer=opt)

    def state(step):
        return json.load(open(os.path.join(out, f"checkpoint-{step}", T.STATE_FILE)))

    T.save_checkpoint(accelerator, args, 4, 0, schedule)
    first_lr = args.learning_rate
    args.learning_rate = first_lr / 2  # what tells the two saves of step 4 apart
    real_replace = os.replace

    def killed_at_the_new_rename(src, dst):
        if os.path.basename(src).startswith(".tmp-checkpoint-"):
            raise KeyboardInterrupt  # the old one is aside, the new one complete but not yet in place
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_new_rename)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(accelerator, args, 4, 0, schedule)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not os.path.exists(os.path.join(out, "checkpoint-4"))  # the window this test is about
    open(os.path.join(out, "notes.txt"), "w").close()
    T.tidy_output_dir(out)
    assert sorted(os.listdir(out)) == ["checkpoint-4", "notes.txt"] and state(4)["learning_rate"] == first_lr

    T.save_checkpoint(accelerator, args, 4, 0, schedule)  # uninterrupted: the new one replaces the old
    assert sorted(os.listdir(out)) == ["checkpoint-4", "notes.txt"] and state(4)["learning_rate"] == first_lr / 2
    shutil.copytree(os.path.join(out, "checkpoint-4"), os.path.join(out, ".old-checkpoint-4"))  # killed later
    T.tidy_output_dir(out)
    assert sorted(os.listdir(out)) == ["checkpoint-4", "notes.txt"] and state(4)["learning_rate"] == first_lr / 2

    args.checkpoints_total_limit = 1  # pruning renames before it deletes: killed midway, nothing looks complete
    removed = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: removed.append(os.path.basename(path)))
    T.save_checkpoint(accelerator, args, 5, 0, schedule)
    monkeypatch.undo()
    assert removed == [".tmp-checkpoint-removed-4"] and [s for s, _ in T.list_checkpoints(out)] == [5]
    T.tidy_output_dir(out)
    assert sorted(os.listdir(out)) == ["checkpoint-5", "notes.txt"]


def test_a_kill_at_any_moment_of_the_final_export_loses_nothing(tmp_path, monkeypatch):
    """The final export replaces the folders and files of the previous one, which for a full fine-tune continued
    in place is the pipeline the run loaded: a kill between deleting vae/ and moving the new one in lost it for
    good (checkpoints hold the UNet only), and the rerun then deleted the complete copy. Now the next start
    finishes the move, whichever rename the kill came before; a kill while writing keeps the old export."""
    names = ("model_index.json", "vae/config.json", "unet/weights", "model.safetensors")

    def write(folder, version, only=names):
        for name in only:
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                f.write(version)

    real_replace = os.replace
    for kill_at in range(1, 8):  # every rename: 3 old names set aside, 4 new ones moved in
        out = str(tmp_path / f"kill{kill_at}")
        write(out, "old", names[:3])  # (model.safetensors is new in this export)
        write(os.path.join(out, ".export-ready"), "new")
        calls = [0]

        def killed(src, dst):
            calls[0] += 1
            if calls[0] == kill_at:
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            T.commit_export(out, os.path.join(out, ".export-ready"))
        monkeypatch.setattr(os, "replace", real_replace)
        T.tidy_output_dir(out)  # the next run's first step
        assert sorted(os.listdir(out)) == ["model.safetensors", "model_index.json", "unet", "vae"], kill_at
        assert all(open(os.path.join(out, n)).read() == "new" for n in names), kill_at
    out = str(tmp_path / "killed_while_writing")
    write(out, "old", names[:3])
    write(os.path.join(out, ".tmp-export"), "half", names[:1])
    T.tidy_output_dir(out)
    assert sorted(os.listdir(out)) == ["model_index.json", "unet", "vae"]
    assert all(open(os.path.join(out, n)).read() == "old" for n in names[:3])


CRASH_INJECTOR = """
import sys
sys.path.insert(0, {root!r})
import torch, train_sdxl_debias as T
real, calls = T.training_step, [0]
def training_step(*a, **kw):
    calls[0] += 1
    if calls[0] == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return real(*a, **kw)
T.training_step = training_step
sys.exit(T.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["training", "caching latents"])
def test_a_crash_with_loader_workers_still_ends_the_process(tiny_model, shapes, tmp_path, where):
    """The loader's workers ignore SIGTERM (a job-wide stop is the trainer's to handle), so they must be stopped
    explicitly: left to Python's exit, which stops them with SIGTERM, an unexpected error (here a CUDA OOM) left
    the process waiting for them forever, holding its GPU until the job's wall time."""
    code = CRASH_INJECTOR.format(root=ROOT)
    if where == "caching latents":
        code = code.replace("T.training_step = training_step", "T.encode_latents = lambda *a, **kw: training_step()")
        code = code.replace("return real(*a, **kw)", "raise RuntimeError('unreachable')").replace("== 3", "== 1")
    extra = ["--cache_latents"] if where == "caching latents" else []
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args_for(tiny_model, shapes, str(tmp_path / "out"),
                                                                      "--max_train_steps", "6",
                                                                      "--dataloader_num_workers", "2", *extra)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after the error")
    # ...and says in one line what to change, as for other settings that don't fit.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB (simulated))")
    assert "--gradient_checkpointing" in last and "--resume_from_checkpoint latest" in last


def test_a_full_disk_ends_in_one_line_that_says_how_to_go_on(monkeypatch, capsys, tmp_path):
    """A full disk (torch.save reports it as its zip writer's RuntimeError, safetensors as its own error) or a
    read-only one is named in one line with what to do; other errors keep their traceback."""
    import errno

    for error in (OSError(errno.ENOSPC, "No space left on device", "out/checkpoint-6/optimizer.bin"),
                  RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 204864 vs 204756"),
                  RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
                  Exception("Error while serializing: I/O error: No space left on device (os error 28)")):
        monkeypatch.setattr(T, "train", lambda args, error=error: (_ for _ in ()).throw(error))
        assert T.main(["--dataset", "x", "--output_dir", str(tmp_path)]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith("error: the disk is full or read-only")
        assert line.endswith("make room and rerun with --resume_from_checkpoint latest")
        # Which disk: the file, when the error names one, and the room left where this run writes.
        assert re.search(rf"; \d+ MB free for {re.escape(str(tmp_path))}\)", line), line
        assert ("writing out/checkpoint-6/optimizer.bin; " in line) == isinstance(error, OSError)
    # An output folder made read-only under the run (chmod -w, a changed owner): named, with the same way on.
    denied = PermissionError(errno.EACCES, "Permission denied", os.path.join("out", ".tmp-checkpoint-10"))
    monkeypatch.setattr(T, "train", lambda args: (_ for _ in ()).throw(denied))
    assert T.main(["--dataset", "x", "--output_dir", "out"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == ("error: cannot access out/.tmp-checkpoint-10 (Permission denied): give this user read and "
                    "write access to out; checkpoints are complete or absent: then rerun with "
                    "--resume_from_checkpoint latest")
    # A loader worker killed (by the kernel's out-of-memory killer, say), or another process of a torchrun job gone.
    for error, start in ((RuntimeError("DataLoader worker (pid 32018) is killed by signal: Killed. "),
                          "error: a data loader process ended"),
                         (RuntimeError("DataLoader worker (pid(s) 31346) exited unexpectedly"),
                          "error: a data loader process ended"),
                         (RuntimeError("DataLoader worker (pid 9) is killed by signal: Bus error. It is possible "
                                       "that dataloader's workers are out of shared memory."),
                          "error: a data loader process ran out of shared memory"),
                         (RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nRuntimeError: unable to "
                                       "write to file </torch_77_1>: No space left on device (28)"),
                          "error: a data loader process ran out of shared memory"),  # (not "the disk is full")
                         (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                                       "[127.0.0.1]:41923: Connection reset by peer"),
                          "error: another process of this run stopped")):
        monkeypatch.setattr(T, "train", lambda args, error=error: (_ for _ in ()).throw(error))
        assert T.main(["--dataset", "x", "--output_dir", "out"]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith(start) and line.endswith("--resume_from_checkpoint latest")
    # The output or cache folder removed during the run (a shared cache cleaned, a network mount lost).
    for missing, again in (("run/metrics.jsonl", "rerun the same command to start afresh"),
                           ("cache/text-r0-1.safetensors", "rerun with --resume_from_checkpoint latest")):
        gone = (FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / missing)) if "run" in
                missing else FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal "
                                               "Traceback...\nFileNotFoundError: No such file or directory: "
                                               f"{tmp_path / missing}\n"))  # (a loader worker's, as torch re-raises it)
        def train(args, gone=gone):  # (once training began: before, a missing file is no folder removed)
            monkeypatch.setattr(T, "claimed", True)
            raise gone
        monkeypatch.setattr(T, "train", train)
        assert T.main(["--dataset", "x", "--output_dir", str(tmp_path / "run"), "--data_cache_dir",
                       str(tmp_path / "cache")]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"error: {tmp_path / missing.split('/')[0]} disappeared during the run")
        assert again in line
    for bug in (RuntimeError("a bug"), OSError("a bug without an errno"),
                FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/elsewhere/a bug"),
                PermissionError(errno.EACCES, "Permission denied", "/etc/elsewhere")):  # not ours to write
        monkeypatch.setattr(T, "train", lambda args, bug=bug: (_ for _ in ()).throw(bug))
        with pytest.raises(type(bug), match="a bug|Permission denied"):
            T.main(["--dataset", "x", "--output_dir", "out"])


def test_a_second_run_in_the_same_output_dir_is_refused_while_the_first_runs(tiny_model, shapes, tmp_path):
    """A job requeued while the old one still runs must not interleave checkpoints and metrics with it: the
    second run stops in one line before it touches anything. A killed run's lock goes with its process."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # the first run, as far as the lock can tell
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on node-7\n")
        held.flush()
        (out / ".tmp-checkpoint-5").mkdir()  # the first run's checkpoint in progress
        proc = run_trainer(*args_for(tiny_model, shapes, str(out), "--max_train_steps", "1"), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: another run is training in {out} (pid 4242 on node-7): wait for it to end, stop it, or pass "
            "another --output_dir")
        assert (out / ".tmp-checkpoint-5").is_dir()
    run_trainer(*args_for(tiny_model, shapes, str(out), "--max_train_steps", "1"))  # released: it runs
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / ".tmp-checkpoint-5").exists()


def test_a_failed_start_removes_only_the_folders_it_made(tmp_path, monkeypatch):
    """A run stopped before it starts removes the output folders it created (holding only its lock), its new
    parents too, never a folder that was there before or that another run holds; a later run in the same
    process locks the folder again."""
    import fcntl

    def start(output_dir):  # what setup() does for the main process
        args = T.parse_args(["--dataset", "x", "--output_dir", str(output_dir)])
        args.made_output_dir = T.outermost_missing(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        T.lock_output_dir(args.output_dir)
        return args

    monkeypatch.setattr(T, "_LOCK", None)
    (tmp_path / "runs").mkdir()
    args = start(tmp_path / "runs" / "new" / "lora")
    T.forget_output_dir(args)
    assert os.listdir(tmp_path / "runs") == []  # new/ and new/lora/ gone, runs/ (there before) kept
    args = start(tmp_path / "runs" / "new" / "lora")  # the same folder again, in the same process
    with open(tmp_path / "runs" / "new" / "lora" / ".lock") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked again, by this process
    (tmp_path / "runs" / "new" / "lora" / "cache").mkdir()  # something else there: kept
    T.forget_output_dir(args)
    assert sorted(os.listdir(tmp_path / "runs" / "new" / "lora")) == [".lock", "cache"]
    monkeypatch.setattr(T, "_LOCK", None)  # refused: another run holds the lock (and made the folder) just now
    args = T.parse_args(["--dataset", "x", "--output_dir", str(tmp_path / "theirs")])
    args.made_output_dir = T.outermost_missing(args.output_dir)
    os.makedirs(args.output_dir)
    (tmp_path / "theirs" / ".lock").touch()
    T.forget_output_dir(args)
    assert os.listdir(tmp_path / "theirs") == [".lock"]
