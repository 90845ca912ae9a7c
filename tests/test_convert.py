"""launch/convert.py: RWKV-4 weights in (Hugging Face RwkvForCausalLM, BlinkDL .pth) and out (to
RwkvForCausalLM), checked by logits against randomly initialized `transformers` RWKV models."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import torch

from rrwkv.pretrain.export import load_model, save_model_dir
from rrwkv.pretrain.model import RRWKV, RRWKVConfig

ROOT = Path(__file__).resolve().parents[1]
V, C, L = 97, 32, 3


def convert(*args, subprocess_=False):
    """launch/convert.py with these arguments: in a new process, or (faster) the same main in this one."""
    argv = [str(a) for a in args]
    if subprocess_:
        return subprocess.run([sys.executable, str(ROOT / "launch/convert.py"), *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    from rrwkv.pretrain.cli.convert import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def write_tokenizer(path: Path) -> Path:
    """A small real Hugging Face tokenizer.json (word level) with an end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def hf_model(seed=0):
    from transformers import RwkvConfig, RwkvForCausalLM
    cfg = RwkvConfig(vocab_size=V, context_length=64, hidden_size=C, num_hidden_layers=L, intermediate_size=4 * C,
                     rescale_every=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = RwkvForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor matters, none is left at a symmetric init
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def hf_logits(m, ids):
    # transformers' CPU WKV casts keys to float32 even in a float64 model: agreement is to ~1e-7, not 1e-12.
    with torch.no_grad():
        return m.double()(ids).logits


def ours_logits(model_dir, ids):
    with torch.no_grad():
        return load_model(model_dir, dtype=torch.float64)(ids)


IDS = torch.randint(0, V, (2, 41), generator=torch.Generator().manual_seed(5))


def test_from_hf_rwkv_gives_the_same_logits(tmp_path):
    m = hf_model()
    m.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf" / "tokenizer.json")
    p = convert("--from", "hf-rwkv", "--input", tmp_path / "hf", "--output", tmp_path / "ours", subprocess_=True)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["medium_interval"] == 0 and cfg["n_layer"] == L and cfg["n_embd"] == C and cfg["ffn_mult"] == 4
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    ref, got = hf_logits(m, IDS), ours_logits(tmp_path / "ours", IDS)
    assert ref.abs().max() > 1                           # not a degenerate model
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # fp32 both sides: the same up to float32 rounding
    with torch.no_grad():
        ref32 = hf_model().float()(IDS).logits
        got32 = load_model(tmp_path / "ours")(IDS)
    torch.testing.assert_close(got32, ref32, atol=2e-4, rtol=1e-4)


def test_to_hf_rwkv_gives_the_same_logits(tmp_path):
    from transformers import RwkvForCausalLM
    ours = RRWKV(RRWKVConfig(vocab_size=V, n_layer=L, n_embd=C, ctx_len=64, medium_interval=0), init_seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_model_dir(ours.state_dict(), ours.cfg.to_dict(), write_tokenizer(tmp_path / "tok.json"), tmp_path / "ours")
    p = convert("--to", "hf-rwkv", "--input", tmp_path / "ours", "--output", tmp_path / "hf")
    assert p.returncode == 0, p.stderr[-2000:]
    m = RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert m.config.rescale_every == 0 and (tmp_path / "hf" / "tokenizer.json").is_file()
    with torch.no_grad():
        ref = ours.double().eval()(IDS)
    torch.testing.assert_close(hf_logits(m, IDS), ref, atol=1e-5, rtol=1e-5)
    # and back again: the same tensors
    p = convert("--from", "hf-rwkv", "--input", tmp_path / "hf", "--output", tmp_path / "back")
    assert p.returncode == 0, p.stderr[-2000:]
    torch.testing.assert_close(ours_logits(tmp_path / "back", IDS), ref, atol=0, rtol=0)


def blinkdl_state_dict(m):
    """The RWKV-4 .pth layout of BlinkDL's trainer (RWKV-LM/RWKV-v4neo), spelled out from the HF model."""
    hf = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd = {"emb.weight": hf["rwkv.embeddings.weight"], "blocks.0.ln0.weight": hf["rwkv.blocks.0.pre_ln.weight"],
          "blocks.0.ln0.bias": hf["rwkv.blocks.0.pre_ln.bias"], "ln_out.weight": hf["rwkv.ln_out.weight"],
          "ln_out.bias": hf["rwkv.ln_out.bias"], "head.weight": hf["head.weight"]}
    for i in range(L):
        b, h = f"blocks.{i}.", f"rwkv.blocks.{i}."
        for ln in ("ln1", "ln2"):
            for wb in ("weight", "bias"):
                sd[f"{b}{ln}.{wb}"] = hf[f"{h}{ln}.{wb}"]
        for ours, theirs in [("time_decay", "time_decay"), ("time_first", "time_first"), ("time_mix_k", "time_mix_key"),
                             ("time_mix_v", "time_mix_value"), ("time_mix_r", "time_mix_receptance")]:
            sd[f"{b}att.{ours}"] = hf[f"{h}attention.{theirs}"]
        for lin in ("key", "value", "receptance", "output"):
            sd[f"{b}att.{lin}.weight"] = hf[f"{h}attention.{lin}.weight"]
        sd[f"{b}ffn.time_mix_k"] = hf[f"{h}feed_forward.time_mix_key"]
        sd[f"{b}ffn.time_mix_r"] = hf[f"{h}feed_forward.time_mix_receptance"]
        for lin in ("key", "value", "receptance"):
            sd[f"{b}ffn.{lin}.weight"] = hf[f"{h}feed_forward.{lin}.weight"]
    return {k: v.to(torch.bfloat16 if v.dim() == 2 else torch.float32) for k, v in sd.items()}


def test_from_rwkv4_pth_gives_the_same_logits(tmp_path):
    m = hf_model(seed=1)
    sd = blinkdl_state_dict(m)
    torch.save(sd, tmp_path / "rwkv4.pth")
    p = convert("--from", "rwkv4-pth", "--input", tmp_path / "rwkv4.pth", "--output", tmp_path / "ours",
                "--tokenizer", write_tokenizer(tmp_path / "tok.json"), "--ctx-len", 512)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["ctx_len"] == 512
    with torch.no_grad():  # the HF model with the .pth's (bf16-rounded) matrices
        for k, v in m.state_dict().items():
            v.copy_(v.to(torch.bfloat16).float() if v.dim() == 2 else v)
    torch.testing.assert_close(ours_logits(tmp_path / "ours", IDS), hf_logits(m, IDS), atol=1e-5, rtol=1e-5)


def test_conversion_errors_are_one_line(tmp_path):
    ours = RRWKV(RRWKVConfig(vocab_size=V, n_layer=2, n_embd=C, medium_interval=8, se_reduction=4))
    save_model_dir(ours.state_dict(), ours.cfg.to_dict(), write_tokenizer(tmp_path / "tok.json"), tmp_path / "rr")
    cases = [
        (["--to", "hf-rwkv", "--input", tmp_path / "rr", "--output", tmp_path / "o1"],
         "has medium_interval 8: only interval-0 (RWKV-4) models convert to RwkvForCausalLM, which has no mediums; "
         "use --to hf-rrwkv"),
        (["--from", "hf-rwkv", "--input", tmp_path / "missing", "--output", tmp_path / "o2"], "no config.json there"),
        (["--to", "hf-rwkv", "--input", tmp_path / "missing", "--output", tmp_path / "o3"],
         "expected model.safetensors and config.json"),
        (["--from", "hf-rwkv", "--to", "hf-rrwkv", "--input", tmp_path / "rr", "--output", tmp_path / "o6"],
         "give exactly one of --from hf-rwkv | --from rwkv4-pth | --from hf-rrwkv"),
    ]
    sd = blinkdl_state_dict(hf_model())
    sd["blocks.0.att.time_faaaa"] = torch.zeros(C)                # an RWKV-5 tensor
    torch.save(sd, tmp_path / "rwkv5.pth")
    cases.append((["--from", "rwkv4-pth", "--input", tmp_path / "rwkv5.pth", "--output", tmp_path / "o4",
                   "--tokenizer", tmp_path / "tok.json"], "does not have RWKV-4's tensors: unexpected ['blocks.0.att.time_faaaa']"))
    sd.pop("blocks.0.att.time_faaaa")
    torch.save(sd, tmp_path / "notok.pth")
    cases.append((["--from", "rwkv4-pth", "--input", tmp_path / "notok.pth", "--output", tmp_path / "o5"],
                  "pass --tokenizer PATH"))
    for i, (args, message) in enumerate(cases):
        p = convert(*args, subprocess_=i == 0)
        err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1 and message in err[0], (args, p.stderr[-1500:])
        assert "Traceback" not in p.stderr
