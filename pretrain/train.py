"""One training run, composed: config -> processes -> data -> model -> engine -> resume -> loop -> save.

`rrwkv-pretrain` / `launch/pretrain.py` (pretrain/cli/train.py) parse the command line and call
`train(cfg, early_signals)`; the exit statuses are listed there.
"""
import time
from pathlib import Path

from . import checkpoint, faults, runfiles
from .config import model_config, model_fields
from .data.sources import (check_sources, micro_batches, prepare_data, tokens_by_source, train_batches,
                           valid_batches, valid_sources)
from .distributed import start
from .downstream import DownstreamEval
from .engine import all_reduce_sum, current_lr, evaluate, train_step
from .evaluation import perplexity
from .metrics import MetricsLogger, StepTimer, check_logging, device_peak, flops_per_token
from .parallelize import build_engine, build_model
from .plan import make_plan


def train(cfg, early_signals=()) -> int:
    out = Path(cfg.run.out_dir)
    runfiles.check_out_dir(out)                                              # bad input fails before start-up
    check_sources(cfg)
    check_logging(cfg)
    tasks = DownstreamEval(cfg) if cfg.train.eval_tasks else None          # lm-eval tasks, found before start-up
    dist = start(cfg)                                                        # processes, seeds
    plan = make_plan(cfg, dist.world_size, dist.rank, dist.device)            # layout, steps, DeepSpeed config
    lock = runfiles.own_out_dir(out, dist)          # one run per out_dir: held until train() returns
    sources = prepare_data(cfg, dist)                                       # shards (built-in corpus on first use)
    model = build_model(cfg, plan, dist)                                    # RRWKV or its pipeline stages
    engine = build_engine(model, cfg, plan)                                 # DeepSpeed
    batches = train_batches(cfg, sources, plan)                             # this rank's rows of each batch
    resume_dir = checkpoint.find_resume_dir(out, cfg.run.resume, dist.say)
    client = {"step": 0, "tokens": 0}
    if resume_dir is not None:                                                # model, optimizer, data, RNG
        client = checkpoint.load(engine, resume_dir, dist.rank, plan.data_parallel, model_fields(cfg))
        batches.load_state_dict(checkpoint.merged_lanes(client))
        checkpoint.set_rng_state(client["mine"]["rng"])
    step, tokens = client["step"], client["tokens"]
    window = client.get("windows", step)                                    # data windows read (one a step)
    skip, rollbacks = set(client.get("skip_windows", [])), client.get("rollbacks", 0)
    steps = micro_batches(batches, plan.micro_batch_size)                  # each step's micro-batches
    runfiles.write_run_files(cfg, out, dist, plan, resumed_at=step)
    log = MetricsLogger(out, cfg, plan.max_steps, step, dist.is_main, client.get("wandb_id"))
    peak, peak_name = device_peak(dist.device, cfg.train.peak_tflops)
    flops = flops_per_token(model_config(cfg))
    timer = StepTimer(plan.step_tokens, flops, peak, dist.world_size,
                      recompute=cfg.train.activation_checkpointing)
    stop = faults.StopRequest(list(early_signals))
    bad = faults.BadSteps(cfg.train.max_bad_steps, fp16=cfg.train.precision == "fp16")
    spike = faults.SpikeGuard(cfg.train.spike_factor, cfg.train.spike_history, cfg.train.spike_steps)
    watchdog = faults.Watchdog(dist.rank, cfg.parallel.stall_timeout_s)
    runfiles.announce(cfg, dist, plan, flops, peak_name, resume_dir, step)

    saver = checkpoint.Saver(engine, out / "checkpoints", cfg.train.keep_last, cfg.train.async_save, dist.say,
                             cfg.parallel.timeout_minutes)   # its timings go into the next metrics rows

    def save():            # with train.async_save it returns once the state is copied; saver.wait() commits
        saver.save(step, {"tokens": tokens, "wandb_id": log.wandb_id, "model_config": model_fields(cfg),
                          "windows": window, "skip_windows": sorted(skip), "rollbacks": rollbacks},
                   {"lanes": batches.state_dict(), "rng": checkpoint.rng_state()})

    def roll_back(point, spiked):
        """To checkpoint `point`: model, optimizer, RNG and data position; the spike's windows are skipped."""
        nonlocal client, step, tokens, window, steps
        client = checkpoint.load(engine, point, dist.rank, plan.data_parallel, model_fields(cfg))
        batches.load_state_dict(checkpoint.merged_lanes(client))
        checkpoint.set_rng_state(client["mine"]["rng"])
        steps.close()
        steps = micro_batches(batches, plan.micro_batch_size)
        log.log({"step": step, "event": "rollback", "to_step": client["step"], "skip_windows": spiked,
                 "rollbacks": rollbacks})
        dist.say(f"warning: loss spike for {len(spiked)} steps (above {cfg.train.spike_factor} x its running "
                 f"median) at step {step}; rolled back to step {client['step']}, skipping data windows {spiked}",
                 err=True)
        step, tokens, window = client["step"], client["tokens"], client.get("windows", client["step"])

    while step < plan.max_steps:                                         # loop
        t_data = time.perf_counter()
        micro, window = next(steps, None), window + 1
        while micro is not None and window in skip:                            # a spike's data, rolled back
            micro, window = next(steps, None), window + 1
        timer.data_wait(time.perf_counter() - t_data)
        if micro is None:
            dist.say(f"data exhausted after {step} steps")
            break
        lr, skipped_before = current_lr(engine), engine.skipped_steps
        loss = train_step(engine, micro, dist.device, step + 1, cfg.train.l2wrap, window=window)
        step, tokens = step + 1, tokens + timer.step_tokens
        if spike.update(loss, window):                                        # loss spike: roll back, skip
            saver.wait()                                                      # a save in flight: committed
            point = checkpoint.find_resume_dir(out, "auto", dist.say)
            if point is None or rollbacks >= cfg.train.max_rollbacks:
                why = "no checkpoint to roll back to" if point is None else f"{rollbacks} rollbacks (train.max_rollbacks)"
                dist.say(f"error: loss spike at step {step} and {why}; stopping, the last good checkpoint is kept",
                         err=True)
                return faults.BAD_STEPS_EXIT
            rollbacks += 1
            skip.update(spike.windows)
            roll_back(point, spike.reset())
            timer.pause()
            continue
        watchdog.beat(step)
        timer.tick()
        kind = bad.update(loss, engine.skipped_steps > skipped_before)
        if kind:
            log.log({"step": step, "event": f"skipped_step_{kind}", "loss": loss, "bad_in_a_row": bad.in_a_row})
            if bad.exceeded:
                dist.say(f"error: {bad.in_a_row} non-finite steps in a row (train.max_bad_steps); stopping "
                            f"without saving, the last good checkpoint is kept", err=True)
                saver.wait()
                return faults.BAD_STEPS_EXIT
        if step % cfg.train.log_every == 0 or step in (1, plan.max_steps):
            log.log({"step": step, "loss": loss, "lr": lr, "tokens": tokens,
                     **timer.rates(step, plan.max_steps, dist.device), "skipped_steps": bad.total, "rollbacks": rollbacks, **saver.stats(),
                     "overflow_steps": bad.overflows, **runfiles.memory_stats(dist.device),
                     "corrupt_shards": all_reduce_sum(batches.stats()["corrupt_shards"], dist.device)  # each stage reads
                     // cfg.parallel.pipeline_stages,                             # the same lanes
                     **tokens_by_source(sources, batches, skip, dist.device, cfg.parallel.pipeline_stages)})
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and sources.valid:
            val = evaluate(engine, valid_batches(cfg, sources, plan), dist.device)
            by_source = {name: evaluate(engine, b, dist.device) for name, b in valid_sources(cfg, sources, plan)}
            log.log({"step": step, "val_loss": val, "val_ppl": perplexity(val),
                     **({"val_loss_by_source": by_source} if by_source else {})})
            timer.pause()
        if tasks is not None and tasks.due(step, plan.max_steps):              # downstream tasks (lm-eval)
            row = tasks.run(engine, sources.tokenizer, dist.device)           # every rank scores its share
            if row is not None:
                log.log({"step": step, **row})
            timer.pause()
        if stop.agreed(dist.device):                                          # preemption: save and requeue
            save()
            saver.wait()                                                      # `latest` names it: requeue
            runfiles.mark_requeue(out, dist, step)
            log.close()
            return faults.REQUEUE_EXIT
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < plan.max_steps \
                and not spike.windows:                                        # (never in a spike's midst)
            save()                                                            # checkpoints
            timer.pause()
    if step > client["step"]:
        save()
    saver.wait()
    runfiles.mark_done(out, dist)
    log.close()
    watchdog.close()
    if lock is not None:                                                     # (an early return releases it too)
        lock.release()
    dist.say(f"done: step {step}, outputs in {out}")
    return 0

