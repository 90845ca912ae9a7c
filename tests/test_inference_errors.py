"""Bad input to the programs after training (export, generate, evaluate, convert), on real small models:
one `error:` line naming the flag or file and what to do, exit status 2, no traceback, nothing evaluated
first; and exported files readable as the umask says."""
import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rrwkv.pretrain.checkpoint import write_atomic
from rrwkv.pretrain.export import save_model_dir

from . import test_generate
from .test_generate import make_model_dir

corpus = test_generate.corpus       # a fixture: the built-in corpus and its tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus):
    return make_model_dir(tmp_path_factory.mktemp("model"), corpus.tokenizer, seed=2)


@pytest.fixture(scope="module")
def data(corpus):
    return corpus.valid.parent


def cli(program, *args):
    """The console script's main (rrwkv-<program>) with these arguments, in this process."""
    from rrwkv.pretrain.cli import convert, evaluate, export, generate
    main = {"convert": convert, "evaluate": evaluate, "export": export, "generate": generate}[program].main
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def assert_one_line(p, message):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (p.args, p.stderr[-1500:])
    assert message in lines[0], (p.args, lines[0])


def write_hf_tokenizer(path: Path, n: int) -> Path:
    """A real word-level Hugging Face tokenizer.json of `n` tokens, with an end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(n - 2)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def copy_model(model_dir, to: Path) -> Path:
    shutil.copytree(model_dir, to)
    return to


NUMERIC = [
    ("evaluate", ["--chunk-len", -4], "argument --chunk-len: takes an integer >= 1, got '-4'"),
    ("evaluate", ["--batch-size", 0], "argument --batch-size: takes an integer >= 1, got '0'"),
    ("evaluate", ["--max-docs", 0], "argument --max-docs: takes an integer >= 1"),
    ("evaluate", ["--max-tokens", -1], "argument --max-tokens: takes an integer >= 1"),
    ("evaluate", ["--task-samples", 0], "argument --task-samples: takes an integer >= 1"),
    ("evaluate", ["--recall-pairs", 0], "argument --recall-pairs: takes an integer >= 1"),
    ("evaluate", ["--task-seed", -1], "argument --task-seed: takes an integer >= 0"),
    ("evaluate", ["--lm-eval-limit", 0], "argument --lm-eval-limit: takes an integer >= 1"),
    ("evaluate", ["--batch-size", "two"], "argument --batch-size: takes an integer >= 1, got 'two'"),
    ("generate", ["--max-new-tokens", 0], "argument --max-new-tokens: takes an integer >= 1"),
    ("generate", ["--temperature", -0.5], "argument --temperature: takes a number >= 0, got '-0.5'"),
    ("generate", ["--temperature", "nan"], "argument --temperature: takes a number >= 0, got 'nan'"),
    ("generate", ["--top-k", -1], "argument --top-k: takes an integer >= 0"),
    ("generate", ["--top-p", 0], "argument --top-p: takes a number in (0, 1], got '0'"),
    ("generate", ["--top-p", 1.5], "argument --top-p: takes a number in (0, 1], got '1.5'"),
    ("generate", ["--seed", -1], "argument --seed: takes an integer in [0, 18446744073709551615]"),
    ("generate", ["--seed", 2 ** 64], "argument --seed: takes an integer in [0, 18446744073709551615]"),
    ("convert", ["--ctx-len", 0], "argument --ctx-len: takes an integer >= 1, got '0'"),
]


@pytest.mark.parametrize("program,args,message", NUMERIC, ids=[f"{c[0]}{c[1][0]}={c[1][1]}" for c in NUMERIC])
def test_numeric_flags_are_range_checked_when_parsed(tmp_path, model_dir, data, program, args, message):
    required = {"evaluate": ["--model", model_dir, "--data", data, "--report", tmp_path / "r.json"],
                "generate": ["--model", model_dir, "--prompt", "x"],
                "convert": ["--from", "rwkv4-pth", "--input", tmp_path / "x.pth", "--output", tmp_path / "o"]}
    p = cli(program, *required[program], *args)
    assert_one_line(p, message)
    assert p.stdout == "" and not (tmp_path / "r.json").exists()


def test_evaluate_checks_the_report_path_before_evaluating(tmp_path, model_dir, data):
    (tmp_path / "a_file").write_text("x")
    cases = [(tmp_path, "is a directory; give a file path"),
             (tmp_path / "a_file" / "r.json", f"its folder {tmp_path / 'a_file'} cannot be made")]
    if os.geteuid() != 0:                  # root may write anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        cases.append((tmp_path / "locked" / "r.json", "cannot be written (permission denied)"))
    for report, message in cases:
        p = cli("evaluate", "--model", model_dir, "--data", data, "--report", report, "--max-docs", 2)
        assert_one_line(p, f"--report {report}")
        assert message in p.stderr and p.stdout == ""          # nothing was evaluated (no loss line)
    # a report in a folder that does not exist yet: made, and written
    p = cli("evaluate", "--model", model_dir, "--data", data, "--report", tmp_path / "new" / "r.json",
            "--max-docs", 2, "--no-tasks")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "new" / "r.json").read_text())["documents"] == 2


def test_a_bad_passkey_distance_fails_before_the_loss_is_evaluated(tmp_path, model_dir, data):
    p = cli("evaluate", "--model", model_dir, "--data", data, "--report", tmp_path / "r.json", "--max-docs", 2,
            "--passkey-distances", 3)
    assert_one_line(p, "passkey distance 3 is shorter than the question")
    assert "loss" not in p.stdout


def test_weights_that_do_not_fit_the_config_are_named(tmp_path, model_dir, data):
    vocab = copy_model(model_dir, tmp_path / "vocab")
    cfg = json.loads((vocab / "config.json").read_text())
    (vocab / "config.json").write_text(json.dumps(dict(cfg, vocab_size=1024)))
    wide = copy_model(model_dir, tmp_path / "wide")
    (wide / "config.json").write_text(json.dumps(dict(cfg, n_embd=64)))
    layers = copy_model(model_dir, tmp_path / "layers")
    (layers / "config.json").write_text(json.dumps(dict(cfg, n_layer=3)))
    cut = copy_model(model_dir, tmp_path / "cut")
    weights = (model_dir / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    junk = copy_model(model_dir, tmp_path / "junk")
    (junk / "model.safetensors").write_bytes(b"\x00" * 64)
    cases = [(vocab, f"{vocab / 'model.safetensors'} does not fit {vocab / 'config.json'} (tensor emb.weight has "
                     f"shape (2048, 32) where the config needs (1024, 32)"),
             (wide, "more tensors of another shape"),
             (layers, "missing ['blocks.2."),
             (cut, f"{cut / 'model.safetensors'} could not be read ("),
             (junk, f"{junk / 'model.safetensors'} could not be read (")]
    for bad, message in cases:
        assert_one_line(cli("generate", "--model", bad, "--prompt", "x", "--max-new-tokens", 2), message)
        p = cli("evaluate", "--model", bad, "--data", data, "--report", tmp_path / "r.json", "--max-docs", 1)
        assert_one_line(p, message)


def test_a_swapped_tokenizer_is_refused(tmp_path, model_dir, data):
    # export records the tokenizer's sha256: another one in its place, even a smaller one, is refused
    swapped = copy_model(model_dir, tmp_path / "swapped")
    (swapped / "tokenizer.model").unlink()
    write_hf_tokenizer(swapped / "tokenizer.json", 100)
    # a MODEL_DIR that records none (tokenizer copied in by hand): one larger than the vocabulary is refused
    unrecorded = tmp_path / "unrecorded"
    from rrwkv.pretrain.export import load_model
    model = load_model(model_dir)
    save_model_dir(model.state_dict(), model.cfg.to_dict(), None, unrecorded)
    write_hf_tokenizer(unrecorded / "tokenizer.json", 3000)
    cases = [(swapped, f"{swapped / 'tokenizer.json'} is not the tokenizer the model was exported with"),
             (unrecorded, f"{unrecorded / 'tokenizer.json'} has 3000 tokens but the model only 2048")]
    for bad, message in cases:
        p = cli("generate", "--model", bad, "--prompt", "w1 w2", "--max-new-tokens", 2)
        assert_one_line(p, message)
        assert p.stdout == ""
        assert_one_line(cli("evaluate", "--model", bad, "--data", data, "--report", tmp_path / "r.json"), message)
    # the right one copied in by hand, to a MODEL_DIR that records none, is fine
    shutil.copy(model_dir / "tokenizer.model", unrecorded)
    (unrecorded / "tokenizer.json").unlink()
    p = cli("generate", "--model", unrecorded, "--prompt", "def", "--max-new-tokens", 2, "--device", "cpu")
    assert p.returncode == 0, p.stderr[-2000:]


def zero0_checkpoint(out_dir: Path, model_dir: Path, step: int = 3) -> Path:
    """A training run's checkpoint in DeepSpeed's ZeRO-0 layout (checkpoints/step<N>/mp_rank_00_model_states.pt
    holding the module's state dict and the client state pretrain/checkpoint.py adds), of a real small model."""
    from rrwkv.pretrain.export import load_model
    model = load_model(model_dir)
    tag = out_dir / "checkpoints" / f"step{step}"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "model_config": model.cfg.to_dict(), "step": step, "tokens": 96},
               tag / "mp_rank_00_model_states.pt")
    (out_dir / "checkpoints" / "latest").write_text(f"step{step}")
    return out_dir


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_get_the_mode_the_umask_gives(tmp_path, model_dir, corpus, umask, mode):
    run = zero0_checkpoint(tmp_path / "run", model_dir)
    old = os.umask(umask)
    try:
        p = cli("export", "--checkpoint", run, "--output", tmp_path / "out", "--tokenizer", corpus.tokenizer)
        (tmp_path / "latest.tmp").write_text("left by a killed writer")
        os.chmod(tmp_path / "latest.tmp", 0o600)
        write_atomic(tmp_path / "latest", "step3")
    finally:
        os.umask(old)
    assert p.returncode == 0, p.stderr[-2000:]
    files = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()}
    assert files == {"model.safetensors": mode, "config.json": mode, "tokenizer.model": mode}, files
    assert (tmp_path / "latest").stat().st_mode & 0o777 == mode and not (tmp_path / "latest.tmp").exists()
    # and the MODEL_DIR is the model, with its tokenizer recorded: it generates
    p = cli("generate", "--model", tmp_path / "out", "--prompt", "def", "--max-new-tokens", 2, "--device", "cpu")
    assert p.returncode == 0, p.stderr[-2000:]


def test_bad_directories_are_one_line(tmp_path, model_dir, corpus, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    no_latest = zero0_checkpoint(tmp_path / "no_latest", model_dir)
    (no_latest / "checkpoints" / "latest").unlink()
    garbage = zero0_checkpoint(tmp_path / "garbage", model_dir)
    (garbage / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00junk")
    blank = zero0_checkpoint(tmp_path / "blank", model_dir)
    (blank / "checkpoints" / "latest").write_text("\n")
    moved = zero0_checkpoint(tmp_path / "moved", model_dir)
    (moved / "checkpoints" / "latest").write_text("step9")
    foreign = zero0_checkpoint(tmp_path / "foreign", model_dir)
    torch.save({"weights": {}}, foreign / "checkpoints" / "step3" / "mp_rank_00_model_states.pt")
    good = zero0_checkpoint(tmp_path / "good", model_dir)
    tok = ["--tokenizer", corpus.tokenizer]
    export_cases = [
        ([tmp_path / "missing"], "no such directory"),
        ([tmp_path / "empty"], "no checkpoint found"),
        ([no_latest], f"no checkpoint found (expected {no_latest / 'checkpoints' / 'latest'})"),
        ([garbage], "not a step<N> checkpoint (it is damaged); pick one with --tag (tags present: ['step3'])"),
        ([blank], "names '', not a step<N> checkpoint"),
        ([moved], "checkpoint " + str(moved / "checkpoints" / "step9") + " not found; tags present: ['step3']"),
        ([foreign], "holds no `module` state dict"),
        ([tmp_path / "a_file"], "is a file; pass a training run's OUT_DIR"),
    ]
    for args, message in export_cases:
        assert_one_line(cli("export", "--checkpoint", *args, "--output", tmp_path / "out", *tok), message)
    assert_one_line(cli("export", "--checkpoint", good, "--output", tmp_path / "a_file", *tok),
                    f"--output {tmp_path / 'a_file'} is a file")
    no_tokenizer = copy_model(model_dir, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.model").unlink()
    model_cases = [
        (tmp_path / "missing", "expected model.safetensors and config.json there"),
        (tmp_path / "empty", "expected model.safetensors and config.json there"),
        (tmp_path / "a_file", "expected model.safetensors and config.json there"),
        (no_tokenizer, "holds no tokenizer.model or tokenizer.json"),
    ]
    for bad, message in model_cases:
        assert_one_line(cli("generate", "--model", bad, "--prompt", "x"), message)
        assert_one_line(cli("evaluate", "--model", bad, "--data", data, "--report", tmp_path / "r.json"), message)
    assert_one_line(cli("generate", "--model", model_dir, "--prompt", "x", "--device", "tpu9"),
                    "--device tpu9: not a device; use cpu, cuda or cuda:N")
    assert_one_line(cli("evaluate", "--model", model_dir, "--data", data, "--report", tmp_path / "r.json",
                        "--device", "tpu9"), "--device tpu9: not a device")


def test_convert_bad_input_is_one_line(tmp_path):
    from rrwkv.pretrain.model import RRWKV, RRWKVConfig
    ours = RRWKV(RRWKVConfig(vocab_size=97, n_layer=1, n_embd=16, ctx_len=32, medium_interval=0), init_seed=0)
    save_model_dir(ours.state_dict(), ours.cfg.to_dict(), write_hf_tokenizer(tmp_path / "tok.json", 97),
                   tmp_path / "rwkv4")
    cut = copy_model(tmp_path / "rwkv4", tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((tmp_path / "rwkv4" / "model.safetensors").read_bytes()[:1000])
    old = os.umask(0o022)
    try:
        p = cli("convert", "--to", "hf-rwkv", "--input", tmp_path / "rwkv4", "--output", tmp_path / "hf")
    finally:
        os.umask(old)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    (tmp_path / "hf" / "config.json").write_text("{not json")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    cases = [
        (["--to", "hf-rwkv", "--input", cut], f"{cut / 'model.safetensors'} could not be read ("),
        (["--from", "hf-rwkv", "--input", tmp_path / "hf"], f"{tmp_path / 'hf' / 'config.json'} is not JSON"),
        (["--from", "rwkv4-pth", "--input", tmp_path / "list.pth"], "holds a list, not a state dict"),
    ]
    for args, message in cases:
        assert_one_line(cli("convert", *args, "--output", tmp_path / "o"), message)
