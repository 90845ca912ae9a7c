"""launch/generate.py: recurrent-mode sampling, deterministic with a seed, its logits those of the
parallel forward; sampling filters; streamed text; one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rrwkv.pretrain.export import load_model, load_tokenizer, save_model_dir
from rrwkv.pretrain.generation import Sampling, TextStream, generate, sample_next
from rrwkv.pretrain.model import RRWKV, RRWKVConfig

ROOT = Path(__file__).resolve().parents[1]


def make_model_dir(path: Path, tokenizer: Path, interval=8, seed=0) -> Path:
    """A small RRWKV with perturbed weights (the zero-initialized projections would hide wiring) and a real tokenizer."""
    cfg = RRWKVConfig(vocab_size=2048, n_layer=2, n_embd=32, ctx_len=32, medium_interval=interval, se_reduction=4)
    model = RRWKV(cfg, init_seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return save_model_dir(model.state_dict(), cfg.to_dict(), tokenizer, path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from rrwkv.data_tools.builtin import prepare_builtin_corpus
    return prepare_builtin_corpus(tmp_path_factory.mktemp("rrwkv-cache"), vocab_size=2048)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus):
    return make_model_dir(tmp_path_factory.mktemp("model"), corpus.tokenizer)


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_generation_logits_equal_the_parallel_forward_and_a_seed_repeats(model_dir):
    model = load_model(model_dir, dtype=torch.float64)
    prompt = torch.randint(0, 2048, (45,), generator=torch.Generator().manual_seed(1)).tolist()  # > ctx_len: chunked prefill
    seen = []
    tokens = list(generate(model, prompt, 30, Sampling(temperature=1.5), seed=7, on_logits=seen.append))
    assert len(tokens) == 30 and len(seen) == 30
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens[:-1]]))[0]
    torch.testing.assert_close(torch.stack(seen), full[len(prompt) - 1:], atol=1e-10, rtol=0)
    assert list(generate(model, prompt, 30, Sampling(temperature=1.5), seed=7)) == tokens
    assert list(generate(model, prompt, 30, Sampling(temperature=1.5), seed=8)) != tokens
    greedy = list(generate(model, prompt, 10, Sampling(temperature=0)))
    assert greedy[0] == int(full[len(prompt) - 1].argmax())


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, Sampling(temperature=0), g).item() == 1
    assert sample_next(logits, Sampling(temperature=5, top_k=1), g).item() == 1
    draws = {sample_next(logits, Sampling(temperature=5, top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 3}
    # top_p: p(1) ~ 0.53, p(3) ~ 0.32 at temperature 1: 0.6 keeps the two, 0.5 keeps only the first
    draws = {sample_next(logits, Sampling(top_p=0.6), g).item() for _ in range(200)}
    assert draws == {1, 3}
    assert {sample_next(logits, Sampling(top_p=0.5), g).item() for _ in range(50)} == {1}
    with pytest.raises(ValueError, match="--top-p"):
        Sampling(top_p=0).check()


def test_text_stream_holds_back_split_characters(corpus):
    tok = load_tokenizer_from(corpus.tokenizer)
    text = "naïve café – 日本語 🙂 done"
    ids = tok.encode(text)
    stream = TextStream(tok.decode)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces) and sum(1 for p in pieces if p) > 3


def load_tokenizer_from(path):
    from rrwkv.data_tools.tokenizer import load_tokenizer
    return load_tokenizer(path)


def test_cli_streams_the_same_text_for_a_seed(model_dir):
    args = ["--model", model_dir, "--prompt", "def main():\n", "--max-new-tokens", 24, "--seed", 3,
            "--temperature", 0.8, "--top-k", 50, "--top-p", 0.95, "--device", "cpu", "--ignore-eos"]
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0, a.stderr[-2000:]
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "tokens/s" in a.stderr and "24 new tokens" in a.stderr
    # the text is the decoded continuation the Python API draws with the same seed
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    ids = list(generate(model, [tok.eos_id] + tok.encode("def main():\n"), 24, Sampling(0.8, 50, 0.95), seed=3))
    assert a.stdout == tok.decode(ids) + "\n"


def test_missing_model_dir_is_one_line(tmp_path):
    p = cli("--model", tmp_path / "nope", "--prompt", "x")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert f"--model {tmp_path / 'nope'}: expected model.safetensors and config.json" in p.stderr
