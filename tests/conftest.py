"""Shared fixtures: one tiny backbone per test session, written to a temporary directory."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prm  # noqa: E402
import tiny_families  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    return prm.save_tiny_backbone(str(tmp_path_factory.mktemp("tiny") / "backbone"))


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family (a model_type of prm.FAMILIES) -> the directory of its tiny backbone with its
    checkpoint's published chat template (tests/tiny_families.py), written once per session."""
    root = tmp_path_factory.mktemp("families")
    return lambda family: tiny_families.save(str(root / family), family)


@pytest.fixture(scope="session")
def tiny_prm(backbone_dir):
    return prm.PRM.from_backbone(backbone_dir).eval()


@pytest.fixture
def images(tmp_path):
    """Three small PNGs of different sizes (different image-token counts)."""
    from PIL import Image, ImageDraw
    paths = []
    for i, (w, h) in enumerate([(56, 56), (90, 60), (112, 112)]):
        im = Image.new("RGB", (w, h), (255 - 60 * i, 40 * i, 90))
        ImageDraw.Draw(im).ellipse([5, 5, w - 5, h - 5], fill=(20 * i, 200, 30))
        p = tmp_path / f"img{i}.png"
        im.save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def text_lm_dir(tmp_path_factory):
    """A tiny text-only causal LM (Qwen2) with the tiny tokenizer: a text PRM backbone and policy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = prm._tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("text-lm") / "lm")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen25_dir(family_dir):
    """A tiny Qwen2.5-VL (window attention in the vision tower) with the tiny tokenizer."""
    return family_dir("qwen2_5_vl")


@pytest.fixture
def small_toy(tmp_path, monkeypatch):
    """A small toy world (4 training questions per domain, 3 meta, 3 test, 4 CoTs each)."""
    import gen_cots
    monkeypatch.setattr(gen_cots, "TOY_SETS", dict(train={d: 4 for d in gen_cots.TOY_DOMAINS}, meta=3, test=3))
    assert gen_cots.main(["--toy", "--toy-dir", str(tmp_path / "toy"), "--n", "4"]) == 0
    return tmp_path / "toy"


def kill_after_lines(args, out, lines, timeout=120):
    """Run a script (args, with --out out) and SIGKILL it once `out` holds `lines` complete lines;
    returns the number of lines it had written. Fails if it finished first."""
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(args + ["--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(out) and open(out).read().count("\n") >= lines:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return open(out).read().count("\n")


def stop_after(monkeypatch, at, argv):
    """bilevel_train.main(argv) stopped as by a crash at the end of iteration `at` (before that
    iteration's logs and checkpoint), for a test of --resume."""
    import bilevel_train as bt

    class Stop(Exception):
        pass
    real = bt.end_of_iteration

    def stop(run, done, *rest):
        if done == at:
            raise Stop
        return real(run, done, *rest)
    with monkeypatch.context() as m:
        m.setattr(bt, "end_of_iteration", stop)
        with pytest.raises(Stop):
            bt.main(argv)


def policy_from_flags(*argv):
    """The policy gen_cots.py and mc_label.py would build from these Policy flags."""
    import gen_cots
    ap = prm.Parser("policy flags")
    prm.add_options(ap, gen_cots.Policy)
    return gen_cots.make_policy(ap.parse_args(list(argv)))
