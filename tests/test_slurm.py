"""launch/slurm/*.sbatch on a real SLURM: two slurmd daemons on this machine as nodes node1 and
node2 (tests/slurm/start_cluster.sh), the tiny config trained on 2 nodes with one CPU process
each (gloo), requeued mid-run by `scontrol requeue` and preempted by SIGUSR1 (checkpoint,
self-requeue, exact resume), and the preprocessing array job merging its slices."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from tests.runs import ROOT, SMALL, env, losses

SLURM_BINARIES = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged")
MISSING = [b for b in SLURM_BINARIES if shutil.which(b) is None]
needs_slurm = pytest.mark.skipif(
    bool(MISSING), reason=f"SLURM is not installed ({', '.join(MISSING)} not found); "
                          f"`tests/slurm/start_cluster.sh --install` (root) installs Debian's slurmctld slurmd "
                          f"slurm-client munge, as .ci/run does")
STATE = Path(os.environ.get("RRWKV_SLURM_STATE", "/run/rrwkv-slurm"))
DAEMONS = {"munged": "munged", "slurmctld": "slurmctld", "slurmd-node1": "slurmd", "slurmd-node2": "slurmd"}
# 8 steps, a checkpoint every 2; every run of the module trains exactly these steps.
STEPS = ["train.max_steps=8", "train.save_every=2"]
SAVE_DELAY = {"RRWKV_FAULT_SAVE_DELAY_S": "1.5"}   # each save pauses 2 x 1.5 s: a window to interrupt the run in


# ---- the cluster ----

def _live_daemons():
    """{name: pid} of the daemons whose PID files in STATE name a live process of the right program."""
    live = {}
    for name, comm in DAEMONS.items():
        try:
            pid = int((STATE / f"{name}.pid").read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                live[name] = pid
        except (OSError, ValueError):
            pass
    return live


def _nodes_up():
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    states = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
    return p.returncode == 0 and all(re.match(r"idle|mixed|allocated|completing", states.get(n, ""))
                                     for n in ("node1", "node2"))


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster: reused when it is already up, else started here and stopped (by PID) at the end."""
    before = _live_daemons()
    if not _nodes_up():
        p = subprocess.run(["bash", str(ROOT / "tests/slurm/start_cluster.sh")], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, f"tests/slurm/start_cluster.sh failed:\n{p.stdout}\n{p.stderr}"
    started = {n: pid for n, pid in _live_daemons().items() if before.get(n) != pid}
    jobs = []
    yield jobs
    for jid in jobs:   # nothing of ours keeps running on a cluster that outlives the tests
        subprocess.run(["scancel", jid], capture_output=True)
    for name in ("slurmd-node1", "slurmd-node2", "slurmctld", "munged"):   # the daemons we started, by PID
        pid = started.get(name)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 15
        while time.time() < deadline and Path(f"/proc/{pid}").exists() and \
                "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (STATE / f"{name}.pid").unlink(missing_ok=True)


# ---- jobs ----

def sbatch(cluster, args, log, extra_env=None):
    """Submit from the repository root with this process's environment; the job id."""
    e = dict(env(), PYTHON=sys.executable, **(extra_env or {}))
    p = subprocess.run(["sbatch", "--parsable", f"--output={log}", *map(str, args)], cwd=ROOT, env=e,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    jid = p.stdout.strip().split(";")[0]
    cluster.append(jid)
    return jid


def job(jid):
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
    p = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def wait_for(what, cond, timeout, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    tail = Path(log).read_text()[-4000:] if log and Path(log).exists() else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")


def wait_done(jid, log, timeout=240):
    """Wait until the job has ended for good (not pending a requeue); its final scontrol record."""
    return wait_for(f"job {jid} to end", lambda: (j := job(jid))["JobState"] in
                    ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and j, timeout, log)


def reached_step(out, step):
    def cond():
        try:
            return step in losses(out)
        except (OSError, json.JSONDecodeError):
            return False
    return cond


def pretrain_args(out, cache, extra=()):
    return ["--nodes=2", "launch/slurm/pretrain.sbatch", "--config", "configs/tiny.yaml", f"run.out_dir={out}",
            f"data.cache_dir={cache}", *SMALL, *STEPS, *extra]


def starts(log_text, jid):
    """The job log cut into one piece per start of the job (restart 0, 1, ...)."""
    parts = re.split(rf"^=== rrwkv-pretrain job {jid} restart \d+ ", log_text, flags=re.M)
    return parts[1:]


CPU = {"RRWKV_PROCS_PER_NODE": "1"}


@pytest.fixture(scope="module")
def reference(cluster, cache_dir, tmp_path_factory):
    """The uninterrupted 2-node run: (out_dir, log, scontrol record)."""
    d = tmp_path_factory.mktemp("slurm-ref")
    out, log = d / "out", d / "job.log"
    jid = sbatch(cluster, pretrain_args(out, cache_dir), log, CPU)
    info = wait_done(jid, log)
    return out, log.read_text(), info


# ---- tests ----

def test_slurm_tasks_per_node_parsing():
    from rrwkv.pretrain.distributed import slurm_tasks_on_node
    assert [slurm_tasks_on_node("2(x3),1", i) for i in range(5)] == [2, 2, 2, 1, 0]
    assert slurm_tasks_on_node("8", 0) == 8 and slurm_tasks_on_node("", 0) == 0


@needs_slurm
def test_two_node_job_trains_on_both_nodes_and_does_not_requeue(reference):
    out, log, info = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "0" and info["NumNodes"] == "2"          # finished: no requeue
    placed = set(re.findall(r"^\d+: rank (\d) of 2 on node (node\d) ", log, flags=re.M))
    assert placed == {("0", "node1"), ("1", "node2")}, log[-4000:]
    assert sorted(losses(out)) == list(range(1, 9))
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step8"
    meta = json.loads((ckpt / "step8" / "rrwkv.json").read_text())
    assert meta["world_size"] == 2 and meta["dp_size"] == 2 and meta["zero_stage"] == 2
    assert sorted(p.name for p in (ckpt / "step8").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    client = torch.load(ckpt / "step8" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert client["world_size"] == 2 and len(client["ranks"]) == 2
    assert client["ranks"][0]["lanes"] != client["ranks"][1]["lanes"]   # each rank's own data position
    assert not (out / "REQUEUE").exists()
    assert "finished at" in log and "requeueing" not in log


@needs_slurm
def test_scontrol_requeue_mid_run_resumes_exactly(cluster, reference, cache_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    jid = sbatch(cluster, pretrain_args(out, cache_dir), log, {**CPU, **SAVE_DELAY})
    wait_for("step 2", reached_step(out, 2), 180, log)
    assert job(jid)["JobState"] == "RUNNING"
    subprocess.run(["scontrol", "requeue", jid], check=True)
    info = wait_done(jid, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1", text[-4000:]   # SLURM requeued it once; the script did not add another
    first, second = starts(text, jid)
    assert "got SIGTERM" in first and "not requeueing" in first
    resumed = re.search(r"resumed from \S+ at step (\d+)", second)
    assert resumed and int(resumed.group(1)) >= 2, second[-4000:]
    assert not re.search(r"^0: step=1 ", second, flags=re.M)          # step 1 was not trained again
    assert re.search(rf"^0: step={int(resumed.group(1)) + 1} ", second, flags=re.M)
    assert losses(out) == losses(reference[0])                        # bit for bit
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["resumed_at_step"] for r in runs] == [0, int(resumed.group(1))]


@needs_slurm
def test_preemption_signal_checkpoints_every_rank_and_requeues(cluster, reference, cache_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    jid = sbatch(cluster, pretrain_args(out, cache_dir), log, {**CPU, **SAVE_DELAY})
    wait_for("step 2", reached_step(out, 2), 180, log)
    # What --signal=B:USR1@600 sends before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    requeued = wait_for("the requeue", lambda: job(jid)["Restarts"] == "1", 120, log)
    assert requeued
    info = wait_done(jid, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-4000:]
    first, second = starts(text, jid)
    assert "got SIGUSR1" in first
    assert re.search(r"^0: rank 0: got SIGUSR1", first, flags=re.M) and \
        re.search(r"^1: rank 1: got SIGUSR1", first, flags=re.M), first[-4000:]  # srun delivered it to every rank
    saved = re.search(r"stopped on signal after saving step (\d+)", first)
    assert saved and 2 <= int(saved.group(1)) < 8, first[-4000:]
    assert "exit code 75" in first and f"requeueing job {jid}" in first
    assert f"resumed from {out / 'checkpoints'} at step {saved.group(1)}" in second   # the signal's checkpoint
    assert not re.search(r"^0: step=1 ", second, flags=re.M)
    assert losses(out) == losses(reference[0])
    assert not (out / "REQUEUE").exists()          # the finished run removed the marker


@needs_slurm
def test_time_limit_signal_checkpoints_and_requeues(cluster, cache_dir, tmp_path):
    """The --signal=B:USR1@SECONDS option itself: a 2-minute job is signalled 90 s before its limit."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    long_run = ["train.max_steps=20000", "train.save_every=5000", "train.log_every=100"]
    jid = sbatch(cluster, ["--time=2", "--signal=B:USR1@90", *pretrain_args(out, cache_dir, long_run)], log, CPU)
    wait_for("the requeue", lambda: job(jid)["Restarts"] == "1", 150, log)
    resumed = wait_for("the restart to resume", lambda: re.search(
        r"resumed from \S+ at step (\d+)", "".join(starts(log.read_text(), jid)[1:])), 120, log)
    subprocess.run(["scancel", jid], check=True)
    wait_done(jid, log, timeout=90)
    first = starts(log.read_text(), jid)[0]
    assert "pretrain.sbatch: got SIGUSR1" in first and f"requeueing job {jid}" in first, first[-3000:]
    saved = re.search(r"stopped on signal after saving step (\d+)", first)
    assert saved and saved.group(1) == resumed.group(1)
    assert (out / "checkpoints" / f"step{saved.group(1)}" / "rrwkv.json").is_file()


@needs_slurm
def test_bad_input_fails_without_requeue(cluster, cache_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    jid = sbatch(cluster, pretrain_args(out, cache_dir, ["train.max_step=5"]), log, CPU)
    info = wait_done(jid, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text[-3000:]
    assert "unknown config key 'train.max_step'" in text and "did you mean 'train.max_steps'" in text


@needs_slurm
def test_preprocess_array_job_merges_its_slices(cluster, tmp_path):
    from rrwkv.data_tools.cli import main as cli
    from rrwkv.data_tools.manifest import load_manifest
    from rrwkv.data_tools.tokenizer import train_sentencepiece

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text(encoding="utf-8") for n in
             ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py", "glob.py", "heapq.py",
              "keyword.py", "sched.py", "queue.py", "copy.py", "numbers.py"]]
    model = train_sentencepiece(texts, 500, tmp_path / "sp")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):   # several input files
        (src / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::4]))
    kw = ["--tokenizer", str(model), "--shard-tokens", "2000", "--unit-mb", "0.02"]
    whole = tmp_path / "whole"
    assert cli(["tokenize", "--input", str(src), "--output", str(whole), *kw]) == 0

    out, logs = tmp_path / "sliced", tmp_path / "logs"
    logs.mkdir()
    # The script asks for 16 CPUs per task; this cluster's nodes have fewer.
    jid = sbatch(cluster, ["--array=0-2", "--cpus-per-task=1", "launch/slurm/preprocess.sbatch", "--input", src,
                           "--output", out, *kw], logs / "pre-%A_%a.log")
    deadline = time.time() + 180

    def all_done():
        p = subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True)
        return p.returncode == 0 and not p.stdout.strip()
    wait_for(f"array job {jid}", all_done, max(1, deadline - time.time()))
    task_logs = sorted(logs.glob("pre-*.log"))
    texts_of = [p.read_text() for p in task_logs]
    assert len(task_logs) == 3, texts_of
    states = [job(f"{jid}_{i}") for i in range(3)]
    assert all(s["JobState"] == "COMPLETED" and s["ExitCode"] == "0:0" for s in states), texts_of
    assert sum("merged 3 slice(s)" in t for t in texts_of) == 1, texts_of
    a, b = load_manifest(whole), load_manifest(out)
    assert len(b.shards) == len(a.shards) > 3
    assert [s["sha256"] for s in b.shards] == [s["sha256"] for s in a.shards]
    assert [(s["docs"], s["tokens"]) for s in b.shards] == [(s["docs"], s["tokens"]) for s in a.shards]
    assert b.total_tokens == a.total_tokens
    assert cli(["verify", str(out)]) == 0


def test_deepspeed_no_ssh_two_node_ranks(cache_dir, tmp_path):
    """docs/cluster.md's multi-node launch without ssh: the same `deepspeed --hostfile --no_ssh` command
    on every node with its own --node_rank (here two "nodes" of one CPU process each on this machine)."""
    from tests.runs import free_port
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "out", free_port()
    args = ["--config", "configs/tiny.yaml", f"run.out_dir={out}", f"data.cache_dir={cache_dir}", *SMALL, *STEPS]
    procs = [subprocess.Popen(["deepspeed", "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/pretrain.py",
                               *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "done: step 8" in logs[0] and "done: step 8" not in logs[1]   # rank 0 is on node rank 0
    run = json.loads((out / "runs.jsonl").read_text())
    assert run["world_size"] == 2
    assert sorted(losses(out)) == list(range(1, 9))
    meta = json.loads((out / "checkpoints" / "step8" / "rrwkv.json").read_text())
    assert meta["world_size"] == 2 and meta["dp_size"] == 2
