#!/usr/bin/env python
"""Pretrain an RRWKV model.

    deepspeed [--num_gpus N | --hostfile FILE] launch/pretrain.py --config configs/X.yaml [key=value ...]
    python launch/pretrain.py --config configs/X.yaml [key=value ...]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import checkpoint  # noqa: E402
from pretrain import run as cli  # noqa: E402
from pretrain.engine import batch_layout, build_engine, current_lr, evaluate, train_step  # noqa: E402
from pretrain.metrics import MetricsLogger, device_peak, flops_per_token  # noqa: E402


def main(argv):
    cfg = cli.parse_config(argv, prog="launch/pretrain.py")                    # config
    dist = cli.init(cfg)                                                      # processes, seeds
    out_dir = Path(cfg.run.out_dir)
    sources = cli.prepare_data(cfg, dist)                                     # shards (built-in corpus on first use)
    model = cli.build_model(cfg, sources, dist)                               # RRWKV
    layout = batch_layout(cfg, dist.world_size)
    engine = build_engine(model, cfg, layout, dist.device)                    # DeepSpeed
    stream = cli.train_stream(cfg, sources, dist)                             # this rank's part of the corpus
    resume_dir = checkpoint.find_resume_dir(out_dir, cfg.run.resume)
    step, tokens, wandb_id = 0, 0, None
    if resume_dir is not None:                                                # model, optimizer, data, RNG
        client = checkpoint.load(engine, resume_dir, dist.rank, dist.world_size, cli.model_fields(cfg))
        step, tokens, wandb_id = client["step"], client["tokens"], client.get("wandb_id")
        stream.load_state_dict(client["mine"]["stream"])
        checkpoint.set_rng_state(client["mine"]["rng"])
    cli.write_run_files(cfg, out_dir, dist, resumed_at=step)
    log = MetricsLogger(out_dir, cfg, cfg.train.max_steps, step, dist.is_main, wandb_id)
    peak, peak_name = device_peak(dist.device, cfg.train.peak_tflops)
    flops = flops_per_token(model)
    if dist.is_main:
        print(f"model: {model.num_params(False) / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP/token; MFU "
              f"against {peak_name}; {dist.world_size} rank(s) on {dist.device.type}, global batch "
              f"{layout.global_batch_size} x {cfg.data.seq_len} tokens; "
              + (f"resumed from {resume_dir} at step {step}" if step else "fresh start"), flush=True)

    def save():
        checkpoint.save(engine, out_dir / "checkpoints", step,
                        {"tokens": tokens, "wandb_id": log.wandb_id, "model_config": cli.model_fields(cfg)},
                        {"stream": stream.state_dict(), "rng": checkpoint.rng_state()}, cfg.train.keep_last)

    batches = iter(stream)
    step_tokens = layout.global_batch_size * cfg.data.seq_len
    window_t, window_steps = time.perf_counter(), 0
    while step < cfg.train.max_steps:                                         # loop
        micro = cli.take(batches, layout.grad_accum)
        if micro is None:
            if dist.is_main:
                print(f"data exhausted after {step} steps (data.max_epochs reached)", flush=True)
            break
        lr = current_lr(engine)
        loss = train_step(engine, micro, dist.device)
        step, tokens, window_steps = step + 1, tokens + step_tokens, window_steps + 1
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or step == 1:
            cli.sync(dist.device)
            dt = time.perf_counter() - window_t
            tps = window_steps * step_tokens / dt
            log.log({"step": step, "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": tps,
                     "mfu": tps * flops / (peak * dist.world_size), "time": time.time(),
                     **cli.memory_stats(dist.device)})
            window_t, window_steps = time.perf_counter(), 0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and cfg.data.valid:
            val = evaluate(engine, cli.valid_batches(cfg, sources, dist), dist.device)
            log.log({"step": step, "val_loss": val, "val_ppl": cli.perplexity(val)})
            window_t, window_steps = time.perf_counter(), 0
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            save()                                                            # checkpoints
            window_t, window_steps = time.perf_counter(), 0
    if step > 0 and (resume_dir is None or step > client["step"]):
        save()
    log.close()
    if dist.is_main:
        print(f"done: step {step}, outputs in {out_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(cli.run_main(main, sys.argv[1:]))
