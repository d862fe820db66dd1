"""scripts/benchmark.py on the tiny UNet, on the CPU: every configuration gives one complete JSON line."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train_sdxl_debias as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

POSITIVE = ("ms_per_step", "ms_per_step_min", "ms_per_step_wall_mean", "img_per_s", "peak_mem_gib",
            "tflop_per_step", "tflop_per_s", "trainable_params_m", "unet_params_m", "setup_s")


def json_rows(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    # One thread: on a busy 2-core machine several threads spin against each other and a step takes seconds.
    cmd = [sys.executable, SCRIPT, "--size", "tiny", "--steps", "5", "--warmup", "1", "--finetune", "lora,full",
           "--with_encoders", "none,all", "--threads", "1", "--out", str(out),
           "--profile", "1", "--rank", "8"]  # --rank: a trainer flag, passed through; it applies to the LoRA rows only
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out


def test_every_configuration_prints_a_complete_json_line(cli_run):
    proc, _ = cli_run
    rows = json_rows(proc.stdout)
    assert [(r["finetune"], r["encoders"]) for r in rows] == [
        ("lora", "none"), ("lora", "all"), ("full", "none"), ("full", "all")]
    for r in rows:
        assert "error" not in r, r["error"]
        for key in POSITIVE:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert math.isfinite(r["warmup_s"]) and r["warmup_s"] >= 0
        assert r["device"] == "cpu" and r["mfu"] is None and r["mem_kind"].startswith("process_")
        assert (r["size"], r["batch_size"], r["resolution"], r["precision"], r["steps"]) == ("tiny", 1, 64, "fp32", 5)
        assert r["gradient_checkpointing"] is False and r["compile"] is False and r["channels_last"] is False
        assert len(r["ms_steps"]) == 5 and min(r["ms_steps"]) == pytest.approx(r["ms_per_step_min"], abs=0.1)
        assert len(r["gc_ms_steps"]) == 5 and all(0 <= g <= t for g, t in zip(r["gc_ms_steps"], r["ms_steps"]))
        assert math.isfinite(r["gc_full_ms"]) and r["gc_full_ms"] >= 0
        assert r["host_syncs_per_step"] is None  # counted with CUDA's sync debug mode only
        assert r["cudnn_benchmark"] is False and "device_busy" not in r  # kernel time / step time: CUDA only
        prof = r["profile"]  # --profile 1: where the CPU step's time went, by aten op
        assert prof["ms_per_step"] > 0 and prof["calls_per_step"] > 100 and len(prof["top"]) == 10
        assert prof["by_kind_ms"]["gemm"] > 0 and prof["by_kind_ms"]["conv"] > 0
        assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["ms_per_step"], rel=0.01)
    lora, lora_enc, full, full_enc = rows
    assert lora["rank"] == 8 and full["rank"] is None
    assert lora["trainable_params_m"] < lora["unet_params_m"] / 10
    assert full["trainable_params_m"] == full["unet_params_m"]
    # Weight gradients cost FLOPs; so do the VAE and text encoders when nothing is cached.
    assert full["tflop_per_step"] > lora["tflop_per_step"]
    assert lora_enc["tflop_per_step"] > lora["tflop_per_step"] and full_enc["tflop_per_step"] > full["tflop_per_step"]


def test_out_file_gets_the_same_lines_and_a_table_comes_last(cli_run):
    proc, out = cli_run
    assert json_rows(out.read_text()) == json_rows(proc.stdout)
    tail = proc.stdout.strip().splitlines()[-5:]
    assert any("ms/step" in line for line in tail) and not tail[-1].startswith("{")


def test_garbage_collection_pauses_are_counted_per_step():
    """A full collection during a timed step shows in that step's gc_ms_steps and nowhere else."""
    import gc

    import benchmark

    class Trainer:
        def step(self, k):
            if k == 1:
                junk = [[i] for i in range(300_000)]  # something for the collector to walk
                gc.collect()
                del junk

    _, _, gc_ms = benchmark.time_steps(Trainer(), 0, 3, torch.device("cpu"))
    assert gc_ms[1] > 1 and gc_ms[0] < 1 and gc_ms[2] < 1, gc_ms  # (a young-generation pass: ~0.01 ms)
    assert not any(isinstance(cb, benchmark.GcPauses) for cb in gc.callbacks)


def test_the_first_steps_and_new_graphs_leave_their_objects_out_of_later_collections():
    """After a run's first steps (compiling, CUDA graph recording), and after a later step that compiled new graphs
    (a new bucket shape), what is alive is frozen, so a later full collection does not walk the models' and
    compiler's objects; objects made otherwise are collected as usual, and main() unfreezes when the run ends."""
    import gc

    from torch._dynamo.utils import counters

    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(2000)])  # ~a model's worth of objects
    heap, graphs = T.HeapFreezer(), counters["stats"]["unique_graphs"]
    try:
        heap.after_step()
        assert gc.get_freeze_count() > 2000
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(layer) in tracked for layer in model)
        for _ in range(T.HEAP_FREEZE_STEPS):  # the first steps, then one more: nothing new compiled
            later = torch.nn.Linear(1, 1)
            heap.after_step()
        assert any(o is later for o in gc.get_objects())
        counters["stats"]["unique_graphs"] += 1  # a step that compiled a graph: what it left is frozen
        heap.after_step()
        assert not any(o is later for o in gc.get_objects())
        assert T.main(["--dataset"]) == 2  # (a flag without its value: one line, exit 2)
        assert gc.get_freeze_count() == 0 and any(o is model[0] for o in gc.get_objects())
    finally:
        counters["stats"]["unique_graphs"] = graphs
        gc.unfreeze()


def test_comma_lists_make_the_cross_product():
    import benchmark

    configs = benchmark.configurations(benchmark.parse_options(
        ["--finetune", "lora,full", "--batch_size", "1,4", "--gradient_checkpointing", "off,on", "--device", "cpu"]))
    assert len(configs) == 8
    assert {(c["finetune"], c["batch_size"], c["gradient_checkpointing"]) for c in configs} == {
        (f, b, g) for f in ("lora", "full") for b in (1, 4) for g in (False, True)}
    bare = benchmark.configurations(benchmark.parse_options(["--gradient_checkpointing", "--with_encoders",
                                                             "--device", "cpu"]))
    assert [(c["gradient_checkpointing"], c["encoders"], c["resolution"]) for c in bare] == [(True, "all", 64)]
    modes = benchmark.configurations(benchmark.parse_options(["--compile", "off,on,reduce-overhead", "--device", "cpu"]))
    assert [(c["compile"], c["compile_mode"]) for c in modes] == [
        (False, "default"), (True, "default"), (True, "reduce-overhead")]
    args = benchmark.trainer_args(modes[2], benchmark.parse_options(["--device", "cpu"]))
    assert args.compile and args.compile_mode == "reduce-overhead"  # handed to the trainer's own flags
    scopes = benchmark.configurations(benchmark.parse_options(["--compile", "off,on", "--compile_scope",
                                                               "blocks,stages", "--device", "cpu"]))
    assert [(c["compile"], c["compile_scope"]) for c in scopes] == [(False, "blocks"), (True, "blocks"),
                                                                   (True, "stages")]  # one eager row
    assert benchmark.trainer_args(scopes[2], benchmark.parse_options(["--device", "cpu"])).compile_scope == "stages"


def test_every_compile_scope_gives_the_eager_output_and_gradients():
    """compile_blocks' scopes (benchmark.py --compile_scope) compile the regions they name, with checkpointing
    too, without graph breaks, and change nothing numerically. Dynamo's eager backend stands in for inductor."""
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    import make_tiny_sdxl

    def run(scope=None):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**make_tiny_sdxl.tiny_unet_config())
        unet.enable_gradient_checkpointing()
        cfg = unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        if scope:
            T.compile_blocks(unet, backend="eager", scope=scope)
        g = torch.Generator().manual_seed(1)
        out = unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]),
                   torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
                   added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}).sample
        out.square().mean().backward()
        compiled = {type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None)}
        return compiled, out.detach(), torch.cat([p.grad.flatten() for p in unet.parameters()]), unet

    _, want, want_grad, unet = run()
    stages = {type(b).__name__ for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]}
    # ("blocks", the trainer's own scope, is compiled in test_train's runs.)
    for scope, regions in (("transformers", {"Transformer2DModel", "ResnetBlock2D"}), ("stages", stages)):
        torch._dynamo.reset()
        counters.clear()
        try:
            compiled, got, grad, _ = run(scope)
            assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], scope
        finally:
            torch._dynamo.reset()
        assert compiled == regions, scope
        assert torch.allclose(got, want, atol=1e-6) and torch.allclose(grad, want_grad, atol=1e-6), scope


def test_a_failing_configuration_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    import benchmark

    real = benchmark.build_parts

    def out_of_memory_at_batch_2(cfg, device, seed):
        if cfg["batch_size"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(cfg, device, seed)

    monkeypatch.setattr(benchmark, "build_parts", out_of_memory_at_batch_2)
    assert benchmark.main(["--batch_size", "2,1", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    failed, ok = json_rows(capsys.readouterr().out)
    assert failed["batch_size"] == 2 and failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "ms_per_step" not in failed
    assert ok["batch_size"] == 1 and "error" not in ok and ok["ms_per_step"] > 0


@pytest.mark.parametrize("lora_flags", [[], ["--lora_target_modules", "to_q,to_k,to_v,to_out.0,conv1,conv2"]])
def test_bf16_lora_skips_peft_input_casts_with_bitwise_equal_loss_and_gradients(lora_flags):
    """Under autocast the trainer turns off peft's cast of each LoRA input to fp32 (a copy there and back per
    layer): the same loss and gradients to the bit, with fewer copy kernels."""
    import benchmark
    import train_sdxl_debias as T
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.copies += func.overloadpacket == torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))

    opts = benchmark.parse_options(["--precision", "bf16", "--device", "cpu", *lora_flags])
    cfg = benchmark.configurations(opts)[0]
    args = benchmark.trainer_args(cfg, opts)
    m = benchmark.prepare_models(benchmark.build_parts(cfg, opts.device, 0), args, opts.device, torch.bfloat16)
    trainer = benchmark.Trainer(m, args, benchmark.synthetic_batch(cfg, m, 0, pin=False), opts.device)
    layers = [mod for mod in m.unet.modules() if hasattr(mod, "cast_input_dtype_enabled")]
    assert layers and not any(layer.cast_input_dtype_enabled for layer in layers)

    def loss_and_grads():
        trainer.generator.manual_seed(0)
        with CountCopies() as counter:
            loss, _ = T.training_step(trainer.batch, m, args, trainer.generator)
            loss.backward()
        grads = [p.grad.clone() for p in trainer.params]
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grads, counter.copies

    loss, grads, copies = loss_and_grads()
    for layer in layers:
        layer.cast_input_dtype_enabled = True  # peft's default
    peft_loss, peft_grads, peft_copies = loss_and_grads()
    assert torch.equal(loss, peft_loss) and all(map(torch.equal, grads, peft_grads))
    assert copies < peft_copies - len(layers)  # at least one copy fewer per LoRA layer


@pytest.mark.parametrize("flag", [["--use_dora"], ["--lora_dropout", "0.1"]])
def test_dora_and_dropout_keep_peft_input_casts(flag):
    """Their norms and scale are computed on the cast input: without the cast the gradients would change."""
    import benchmark

    opts = benchmark.parse_options(["--precision", "bf16", "--device", "cpu", *flag])
    cfg = benchmark.configurations(opts)[0]
    m = benchmark.prepare_models(benchmark.build_parts(cfg, opts.device, 0), benchmark.trainer_args(cfg, opts),
                                 opts.device, torch.bfloat16)
    layers = [mod for mod in m.unet.modules() if hasattr(mod, "cast_input_dtype_enabled")]
    assert layers and all(layer.cast_input_dtype_enabled for layer in layers)


def test_accumulation_runs_the_trainers_micro_batches_then_one_update(monkeypatch):
    """--gradient_accumulation_steps 2: two training_step calls per optimizer step, only the first marked as a
    new step (under CUDA graphs, a mark at the second would overwrite the first's gradients)."""
    import benchmark
    import train_sdxl_debias as T

    opts = benchmark.parse_options(["--device", "cpu", "--gradient_accumulation_steps", "2"])
    cfg = benchmark.configurations(opts)[0]
    args = benchmark.trainer_args(cfg, opts)
    m = benchmark.prepare_models(benchmark.build_parts(cfg, opts.device, 0), args, opts.device, torch.float32)
    trainer = benchmark.Trainer(m, args, benchmark.synthetic_batch(cfg, m, 0, pin=False), opts.device)
    calls, real = [], T.training_step
    monkeypatch.setattr(T, "training_step", lambda *a, new_step: calls.append(new_step) or real(*a, new_step=new_step))
    updates, real_update = [], T.update_weights
    monkeypatch.setattr(T, "update_weights", lambda *a: updates.append(1) or real_update(*a))
    trainer.step(0)
    trainer.step(1)
    assert calls == [True, False, True, False] and len(updates) == 2


def test_sdpa_backend_goes_first_in_torchs_order_and_auto_restores_it():
    """--sdpa_backend puts one attention kernel ahead of the others for the whole process (the others stay as
    fallbacks); the benchmark switches it per configuration, and `auto` gives PyTorch's own order back."""
    import gc

    import benchmark
    import train_sdxl_debias as T
    from torch.nn.attention import SDPBackend

    default = torch._C._get_sdp_priority_order()
    try:
        T.prefer_sdpa_backend("cudnn")
        gc.collect()  # the order must outlive the function's locals
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(order) == sorted(default)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()  # fallbacks
        T.prefer_sdpa_backend("flash")
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)
    finally:
        T.prefer_sdpa_backend("auto")
    assert torch._C._get_sdp_priority_order() == default

    configs = benchmark.configurations(benchmark.parse_options(["--sdpa_backend", "auto,cudnn", "--device", "cpu"]))
    assert [c["sdpa_backend"] for c in configs] == ["auto", "cudnn"]
    assert benchmark.trainer_args(configs[1], benchmark.parse_options(["--device", "cpu"])).sdpa_backend == "cudnn"
    with pytest.raises(SystemExit, match="sdpa_backend"):
        benchmark.configurations(benchmark.parse_options(["--sdpa_backend", "fast", "--device", "cpu"]))
