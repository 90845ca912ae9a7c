"""launch/convert.py --to/--from hf-rrwkv: any RRWKV as a transformers model with remote code, and back.

The shipped modeling code (pretrain/hf/modeling_rrwkv.py, a self-contained copy of the forward math) is
checked here against pretrain/model.py: logits in all three modes, greedy generate() against
pretrain/generation.py, and the pure-PyTorch path in a process where `rrwkv` cannot be imported.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rrwkv.pretrain.export import load_model, save_model_dir
from rrwkv.pretrain.generation import Sampling, generate
from rrwkv.pretrain.model import RRWKV, RRWKVConfig
from rrwkv.pretrain.weights import load_tensors, tensors_metadata

from tests.test_convert import convert, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
T, CUT, PROMPT = 37, 10, 23          # with interval 16: T and CUT and PROMPT all end inside a segment


def perturbed_model(interval: int, vocab: int) -> RRWKV:
    """A tiny RRWKV with every tensor moved off its initialization (zero-init projections included)."""
    model = RRWKV(RRWKVConfig(vocab_size=vocab, n_layer=3, n_embd=32, ctx_len=64, medium_interval=interval,
                              se_reduction=4), init_seed=interval)
    g = torch.Generator().manual_seed(interval + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def sentencepiece_tokenizer(prefix: Path) -> Path:
    """A real byte-fallback sentencepiece BPE (rrwkv-data's trainer) on some of Python's own sources."""
    from rrwkv.data_tools.tokenizer import train_sentencepiece
    texts = [Path(m.__file__).read_text() for m in (json, textwrap, shutil)]
    return train_sentencepiece(texts, 400, prefix, num_threads=1)


class Exported:
    def __init__(self, interval: int, root: Path):
        # interval 0 with a Hugging Face tokenizer.json, interval 16 with a sentencepiece model
        tok = write_tokenizer(root / "tok.json") if interval == 0 else sentencepiece_tokenizer(root / "sp")
        vocab = 97 if interval == 0 else 400
        self.model = perturbed_model(interval, vocab)
        self.model_dir, self.hf_dir = root / "model", root / "hf"
        save_model_dir(self.model.state_dict(), self.model.cfg.to_dict(), tok, self.model_dir)
        p = convert("--to", "hf-rrwkv", "--input", self.model_dir, "--output", self.hf_dir)
        assert p.returncode == 0, p.stderr[-2000:]
        self.ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            self.logits = self.model(self.ids)
        self.eos = 0 if interval == 0 else 2

    def hf_model(self, **kw):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(self.hf_dir, trust_remote_code=True, **kw).eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matrices: on a busy 2-core machine, torch's thread pool costs more than it gives (12x here)."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    made = {}

    def get(interval: int) -> Exported:
        if interval not in made:
            made[interval] = Exported(interval, tmp_path_factory.mktemp(f"interval{interval}"))
        return made[interval]
    return get


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("interval", [0, 16])
def test_logits_equal_ours_in_every_mode(exported, interval):
    e = exported(interval)
    hf = e.hf_model()
    assert type(hf).__name__ == "RRWKVForCausalLM" and hf.dtype == torch.float32
    assert hf.config.medium_interval == interval and hf.config.eos_token_id == e.eos
    assert e.logits.abs().max() > 1                                   # not a degenerate model
    with torch.no_grad():
        whole = hf(e.ids)
        first = hf(e.ids[:, :CUT])                                    # chunks cut inside a segment
        second = hf(e.ids[:, CUT:], state=first.state)
        state, steps = None, []
        for t in range(T):                                            # one token at a time
            out = hf(e.ids[:, t:t + 1], state=state)
            state = out.state
            steps.append(out.logits)
    assert rel_err(whole.logits, e.logits) <= 1e-5
    assert rel_err(torch.cat([first.logits, second.logits], 1), e.logits) <= 1e-5
    assert rel_err(torch.cat(steps, 1), e.logits) <= 1e-5
    # and the same state as ours after the prompt: our model continues from the HF model's state's numbers
    with torch.no_grad():
        _, ours_state = e.model(e.ids[:, :CUT], return_state=True)
    for mine, theirs in zip(ours_state.layers, first.state.layers):
        assert mine.phase == theirs.phase
        torch.testing.assert_close(theirs.wkv.aa, mine.wkv.aa, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.att_x, mine.att_x, rtol=1e-5, atol=1e-6)
    # a batch's state reorders as beam search needs
    with torch.no_grad():
        swapped = hf(e.ids[:, :CUT]).state
        swapped.reorder_cache(torch.tensor([1, 0]))
        cont = hf(e.ids.flip(0)[:, CUT:], state=swapped).logits
    assert rel_err(cont, e.logits.flip(0)[:, CUT:]) <= 1e-5
    # no attention mask: ones are accepted, padding is refused rather than read as tokens
    with torch.no_grad():
        assert torch.equal(hf(e.ids, attention_mask=torch.ones_like(e.ids)).logits, whole.logits)
        padded = torch.ones_like(e.ids)
        padded[1, :3] = 0
        with pytest.raises(ValueError, match="no attention mask: padding would be read as tokens"):
            hf(e.ids, attention_mask=padded)
    # the folder is what was asked for: remote code as shipped, auto_map, a model card with front matter
    for name in ("configuration_rrwkv.py", "modeling_rrwkv.py"):
        assert (e.hf_dir / name).read_bytes() == (ROOT / "pretrain/hf" / name).read_bytes()
    cfg = json.loads((e.hf_dir / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_rrwkv.RRWKVForCausalLM"
    from huggingface_hub import ModelCard
    card = ModelCard.load(e.hf_dir / "README.md")
    assert card.data.library_name == "transformers" and "rrwkv" in card.data.tags
    assert "Training config" not in card.text and "Evaluation" not in card.text   # this MODEL_DIR has neither


@pytest.mark.parametrize("interval", [0, 16])
def test_greedy_generate_gives_our_tokens(exported, interval):
    e = exported(interval)
    hf = e.hf_model()
    with torch.no_grad():
        out = hf.generate(e.ids[:, :PROMPT], max_new_tokens=24, do_sample=False)
    assert out.shape[1] > PROMPT
    for row in range(2):
        prompt = e.ids[row, :PROMPT].tolist()
        # ours prefills in chunks of 16 positions (a cut inside the prompt's second segment), then steps
        ours = list(generate(e.model, prompt, 24, Sampling(temperature=0), chunk_len=16, stop_ids=[e.eos]))
        theirs = out[row, PROMPT:].tolist()
        if e.eos in theirs:                          # a finished row is padded (pad = EOS) to the batch's length
            theirs = theirs[:theirs.index(e.eos) + 1]
        assert theirs == ours, (row, theirs, ours)
    with torch.no_grad():                            # beam search reorders the state between steps
        beams = hf.generate(e.ids[:1, :PROMPT], max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape[0] == 1 and PROMPT < beams.shape[1] <= PROMPT + 5


@pytest.mark.parametrize("interval", [0, 16])
def test_round_trip_gives_identical_tensors(exported, tmp_path, interval):
    e = exported(interval)
    p = convert("--from", "hf-rrwkv", "--input", e.hf_dir, "--output", tmp_path / "back")
    assert p.returncode == 0, p.stderr[-2000:]
    before, after = load_tensors(e.model_dir / "model.safetensors"), load_tensors(tmp_path / "back/model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert (tmp_path / "back/config.json").read_text() == (e.model_dir / "config.json").read_text()
    tok = "tokenizer.json" if interval == 0 else "tokenizer.model"
    assert (tmp_path / "back" / tok).read_bytes() == (e.model_dir / tok).read_bytes()
    if interval == 0:   # the HF tokenizer.json is the MODEL_DIR's file, with its EOS named special on loading
        from transformers import AutoTokenizer

        from rrwkv.pretrain.export import load_tokenizer
        theirs, ours = AutoTokenizer.from_pretrained(e.hf_dir, trust_remote_code=True), load_tokenizer(e.model_dir)
        text = "w1 w7 w3 w95 zzz"
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
        assert theirs.eos_token_id == ours.eos_id and theirs.decode(ours.encode(text), skip_special_tokens=True) == \
            ours.decode(ours.encode(text))
    assert tensors_metadata(tmp_path / "back/model.safetensors")["converted_from"] == "hf-rrwkv"
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "back")(e.ids), e.logits)


def test_bf16_round_trip_keeps_bf16(exported, tmp_path):
    e = exported(16)
    p = convert("--to", "hf-rrwkv", "--input", e.model_dir, "--output", tmp_path / "hf16", "--dtype", "bf16")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "hf16/config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "hf16", trust_remote_code=True)
    assert m.dtype == torch.bfloat16
    p = convert("--from", "hf-rrwkv", "--input", tmp_path / "hf16", "--output", tmp_path / "back")   # as stored
    assert p.returncode == 0, p.stderr[-2000:]
    back = load_tensors(tmp_path / "back/model.safetensors")
    for k, v in e.model.state_dict().items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.to(torch.bfloat16)), k


def test_model_made_from_the_config_is_initialized_as_ours(exported):
    from transformers import AutoConfig, AutoModelForCausalLM
    e = exported(16)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(e.hf_dir, trust_remote_code=True),
                                             trust_remote_code=True)
    theirs = model.state_dict()
    for k, v in RRWKV(e.model.cfg).state_dict().items():         # RWKV-4's curves, zeros and ones are the same
        if "time_" in k or "decay" in k or ".ln" in k or not v.any():
            torch.testing.assert_close(theirs["rrwkv." + k], v, rtol=0, atol=1e-6, msg=k)
    w = theirs["rrwkv.blocks.1.att.value.weight"]                 # orthogonal, as ours
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), rtol=0, atol=1e-5)
    assert 0 < theirs["rrwkv.emb.weight"].abs().max() <= 1e-4


def test_tokenizer_encodes_as_ours(exported):
    from transformers import AutoTokenizer

    from rrwkv.pretrain.export import load_tokenizer
    e = exported(16)                                              # the sentencepiece model, converted
    ours = load_tokenizer(e.model_dir)
    theirs = AutoTokenizer.from_pretrained(e.hf_dir, trust_remote_code=True)
    assert theirs.eos_token_id == ours.eos_id == e.eos
    texts = [Path(textwrap.__file__).read_text()[:2000], "déjà vu 😀\n\tx  = 12345\n", "  two  spaces  "]
    for text in texts:
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
        assert theirs.decode(ours.encode(text), skip_special_tokens=True) == text


BLOCKED = textwrap.dedent("""
    import importlib.abc, sys

    class NoRRWKV(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rrwkv" or name.startswith("rrwkv."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, NoRRWKV())
    try:
        import rrwkv.kernels.wkv
        raise SystemExit("rrwkv is still importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM
    hf_dir, ids_file, out_file = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids[:1, :int(sys.argv[4])], max_new_tokens=12, do_sample=False)
    loaded = sorted(n for n in sys.modules if n.split(".")[0] == "rrwkv")
    assert not loaded, loaded
    torch.save({"logits": logits, "tokens": tokens}, out_file)
""")


def test_loads_and_runs_where_rrwkv_cannot_be_imported(exported, tmp_path):
    e = exported(16)
    torch.save(e.ids, tmp_path / "ids.pt")
    p = subprocess.run([sys.executable, "-c", BLOCKED, str(e.hf_dir), str(tmp_path / "ids.pt"),
                        str(tmp_path / "out.pt"), str(PROMPT)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert rel_err(out["logits"], e.logits) <= 1e-5
    ours = list(generate(e.model, e.ids[0, :PROMPT].tolist(), 12, Sampling(temperature=0), stop_ids=[e.eos]))
    assert out["tokens"][0, PROMPT:].tolist() == ours


def test_model_card_carries_training_config_and_eval_results(exported, tmp_path):
    import numpy as np
    from huggingface_hub import ModelCard

    from rrwkv.pretrain import evaluation as ev
    e = exported(16)
    model_dir = tmp_path / "model"
    shutil.copytree(e.model_dir, model_dir)
    g = np.random.default_rng(0)
    docs = [g.integers(3, 400, n) for n in (40, 90, 300)]
    report = {"data": "held-out", **ev.loss_report(ev.document_losses(e.model, docs, e.eos, 64), [0, 32, 256])}
    (model_dir / "eval.json").write_text(json.dumps(report))
    (model_dir / "training_config.yaml").write_text((ROOT / "configs/tiny.yaml").read_text())
    p = convert("--to", "hf-rrwkv", "--input", model_dir, "--output", tmp_path / "hf")
    assert p.returncode == 0, p.stderr[-2000:]
    card = ModelCard.load(tmp_path / "hf/README.md")
    [result] = card.data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(report["perplexity"])
    assert "## Training config" in card.text and (ROOT / "configs/tiny.yaml").read_text().strip() in card.text
    assert f"| loss | {report['loss']:.4g} |" in card.text and "| 0-32 |" in card.text
    assert (tmp_path / "hf/training_config.yaml").is_file() and (tmp_path / "hf/eval.json").is_file()

    # without a training_config.yaml, the config.yaml of the run the weights were exported from
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints/step2").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model:\n  medium_interval: 16\n")
    save_model_dir(e.model.state_dict(), e.model.cfg.to_dict(), e.model_dir / "tokenizer.model",
                   tmp_path / "exported", metadata={"source": str(run_dir / "checkpoints/step2"), "step": "2"})
    p = convert("--to", "hf-rrwkv", "--input", tmp_path / "exported", "--output", tmp_path / "hf2")
    assert p.returncode == 0, p.stderr[-2000:]
    text = (tmp_path / "hf2/README.md").read_text()
    assert "medium_interval: 16" in text and "training step 2" in text
    assert tensors_metadata(tmp_path / "hf2/model.safetensors")["step"] == "2"


def test_bad_input_is_one_line(exported, tmp_path):
    e = exported(0)
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    no_code = tmp_path / "no_code"
    shutil.copytree(e.hf_dir, no_code)
    (no_code / "modeling_rrwkv.py").unlink()
    p = convert("--to", "hf-rwkv", "--input", e.model_dir, "--output", tmp_path / "rwkv4")   # RwkvForCausalLM
    assert p.returncode == 0, p.stderr[-2000:]
    cases = [
        (["--to", "hf-rrwkv", "--input", tmp_path / "missing", "--output", tmp_path / "o1"],
         "expected model.safetensors and config.json"),
        (["--to", "hf-rrwkv", "--input", not_a_model, "--output", tmp_path / "o2"],
         "expected model.safetensors and config.json"),
        (["--to", "hf-rrwkv", "--input", e.model_dir, "--output", not_a_model], "already exists; give a new directory"),
        (["--from", "hf-rrwkv", "--input", no_code, "--output", tmp_path / "o3"],
         "lacks its remote code (modeling_rrwkv.py)"),
        (["--from", "hf-rrwkv", "--input", e.hf_dir, "--output", not_a_model], "already exists; give a new directory"),
        (["--from", "hf-rrwkv", "--input", e.model_dir, "--output", tmp_path / "o4"], "not 'rrwkv'"),
        (["--from", "hf-rrwkv", "--input", tmp_path / "rwkv4", "--output", tmp_path / "o5"],
         "convert it with --from hf-rwkv"),
        (["--from", "hf-rrwkv", "--input", tmp_path / "missing", "--output", tmp_path / "o6"], "no such directory"),
        (["--to", "hf-rrwkv", "--input", e.model_dir, "--output", tmp_path / "o7", "--tokenizer", "x.json"],
         "--tokenizer is not used with hf-rrwkv"),
    ]
    for i, (args, message) in enumerate(cases):
        p = convert(*args, subprocess_=i == 3)
        err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1 and message in err[0], (args, p.stderr[-1500:])
        assert "Traceback" not in p.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["no_code", "notes", "rwkv4"]   # nothing half-written
    assert [q.name for q in not_a_model.iterdir()] == ["readme.txt"]
