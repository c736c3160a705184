"""`sata train` / `sata generate`: exact resume, distributed == single process, data, sampling, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sata.cli import main as cli_main
from sata.lm import LMConfig, TransformerLM
from sata.train.data import load_corpus
from sata.train.generate import generate, printable, sample_next
from sata.train.loop import TrainConfig, lr_factor, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A small corpus of real text: this package's own sources."""
    d = tmp_path_factory.mktemp("corpus")
    for f in sorted((Path(SRC) / "sata").rglob("*.py")):
        (d / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    return d


@pytest.fixture(scope="module")
def fixed_text_dir(tmp_path_factory) -> Path:
    """Text that stays the same when this package's sources change (seeded words): for comparisons to
    rounding, whose margins must not move with every edit of the corpus."""
    words = ("the state of a sequence is the sum of the states of its segments so a query reads every key "
             "before it through one fixed size state per head while the chunk holds the scores of its own "
             "tokens and the features of the keys are added to the state once").split()
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("fixed_corpus")
    for i in range(40):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(60)]
        (d / f"part_{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return d


def _tiny(out, data, attention="sata", **kw) -> TrainConfig:
    model = LMConfig(d_model=32, n_layers=2, n_heads=4, attention=attention, n_taylor=3)
    base = dict(out=str(out), data=[str(data)], model=model, steps=6, batch_size=4, seq_len=32, warmup=2,
                eval_every=3, eval_tokens=512, save_every=2, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def _params(out) -> dict:
    return TransformerLM.from_pretrained(Path(out) / "checkpoint").state_dict()


# ---------------------------------------------------------------------------- data
class TestData:
    def test_split_is_by_file_and_deterministic(self, text_dir):
        a, b = load_corpus([str(text_dir)]), load_corpus([str(text_dir)])
        assert torch.equal(a.train, b.train) and torch.equal(a.validation, b.validation)
        assert a.n_files[0] > 0 and a.n_files[1] > 0
        # every validation file is absent from the training stream
        val_files = bytes(a.validation.tolist()).split(b"\0")
        assert all(f not in bytes(a.train.tolist()) for f in val_files if len(f) > 200)

    def test_batch_is_a_function_of_the_step_and_ranks_partition_it(self, text_dir):
        c = load_corpus([str(text_dir)])
        x, y = c.batch(5, 8, 16, seed=1)
        assert torch.equal(x, c.batch(5, 8, 16, seed=1)[0]) and not torch.equal(x, c.batch(6, 8, 16, seed=1)[0])
        assert torch.equal(x[:, 1:], y[:, :-1])                            # targets are the next bytes
        parts = [c.batch(5, 8, 16, seed=1, rank=r, world=2)[0] for r in range(2)]
        assert torch.equal(torch.stack(parts, 1).flatten(0, 1), x)

    def test_default_corpus_is_the_standard_library(self):
        c = load_corpus(max_bytes=2_000_000)
        assert "standard library" in c.describe() and c.train.numel() > 1_000_000

    def test_too_little_text_is_refused(self, tmp_path):
        (tmp_path / "a.txt").write_text("hi")
        with pytest.raises(ValueError, match="too little text"):
            load_corpus([str(tmp_path)])

    def test_missing_path(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            load_corpus([str(tmp_path / "nope")])


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(f[:10], f[1:11]))
    assert max(f) == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_mix_lr_gives_the_learned_mix_and_centre_their_own_rate_on_the_schedule(tmp_path, text_dir):
    """--mix-lr: the layers' mix_param / recentre_param in a group at mix_lr x the schedule, the rest at lr; Adam
    moves each by about its rate per step, so the mix moves ~mix_lr / lr times further than at lr."""
    from sata.train.loop import _optimizer

    windowed = dict(window=4, recentre=0.0, learn_mix=True, learn_recentre=True, taylor_mix=0.01)
    cfg = _tiny(tmp_path / "a", text_dir, mix_lr=0.03, model=LMConfig(d_model=32, n_layers=2, n_heads=4, n_taylor=3,
                                                                       **windowed))
    model = TransformerLM(cfg.model)
    groups = _optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    mixes = sorted(names[id(p)] for p in groups[2]["params"])
    assert len(groups) == 3 and groups[2]["lr_scale"] == pytest.approx(10.0) and groups[2]["weight_decay"] == 0.0
    assert mixes == sorted(n for n in names.values() if n.endswith(("mix_param", "recentre_param"))) and len(mixes) == 4
    assert not any(id(p) in map(id, groups[2]["params"]) for g in groups[:2] for p in g["params"])
    assert len(_optimizer(model, dataclasses.replace(cfg, mix_lr=None)).param_groups) == 2   # as before

    moved = {}
    for mix_lr in (None, 0.03):
        out = tmp_path / f"run-{mix_lr}"
        train(dataclasses.replace(cfg, out=str(out), mix_lr=mix_lr), progress=False)
        start = TransformerLM(cfg.model).state_dict()
        end = TransformerLM.from_pretrained(out / "model").state_dict()
        moved[mix_lr] = max((end[k] - start[k]).abs().max().item() for k in start if k.endswith("mix_param"))
    assert moved[0.03] > 4 * moved[None] > 0


# ---------------------------------------------------------------------------- training
class TestTraining:
    @pytest.mark.parametrize("attention", ["sata", "softmax"])
    def test_resume_after_interruption_is_bit_identical(self, tmp_path, text_dir, attention):
        straight = train(_tiny(tmp_path / "a", text_dir, attention), progress=False)
        cfg = _tiny(tmp_path / "b", text_dir, attention)
        first = train(cfg, progress=False, stop_after=3)                   # "interrupted" after step 3
        assert first["step"] == 3
        resumed = train(cfg, resume=True, progress=False)
        pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
        la = [r["loss"] for r in straight["rows"]]
        lb = [r["loss"] for r in resumed["rows"]]
        assert la == lb and len(la) == 6

    def test_learns(self, tmp_path, text_dir):
        res = train(_tiny(tmp_path, text_dir, steps=30, eval_every=30, lr=1e-2), progress=False)
        rows = res["rows"]
        assert rows[-1]["loss"] < rows[0]["loss"] - 1.5                   # from ~ln 256 = 5.5
        assert res["final_val_bpb"] < 6.0
        for name in ("log.csv", "log.json", "loss.png", "model/model.safetensors", "checkpoint/trainer.pt"):
            assert (tmp_path / name).is_file(), name

    def test_validation_shows_its_progress(self, tmp_path, text_dir, capsys):
        train(_tiny(tmp_path, text_dir, steps=2, eval_every=2, eval_tokens=2048), progress=True)
        err = capsys.readouterr().err
        assert "validation" in err and "batch" in err

    def test_resume_with_other_settings_is_refused(self, tmp_path, text_dir):
        train(_tiny(tmp_path, text_dir, steps=2), progress=False)
        with pytest.raises(ValueError, match="different settings.*lr"):
            train(_tiny(tmp_path, text_dir, steps=2, lr=1e-3), resume=True, progress=False)

    def test_resume_without_checkpoint(self, tmp_path, text_dir):
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            train(_tiny(tmp_path, text_dir), resume=True, progress=False)

    def test_batch_not_divisible_by_processes(self, tmp_path, text_dir):
        cfg = _tiny(tmp_path, text_dir, batch_size=3)
        with pytest.raises(ValueError, match="not divisible by the 2 processes"):
            cfg.check(world=2)

    def test_resume_survives_a_save_killed_between_its_renames(self, tmp_path, text_dir):
        cfg = _tiny(tmp_path, text_dir, steps=4, save_every=2)
        train(cfg, progress=False, stop_after=2)
        ckpt = tmp_path / "checkpoint"
        ckpt.rename(tmp_path / "checkpoint.old")        # the state a kill after the first rename leaves
        res = train(cfg, resume=True, progress=False)
        assert res["step"] == 4 and (ckpt / "trainer.pt").is_file()
        assert not (tmp_path / "checkpoint.old").exists()

    def test_resume_unpickles_no_code(self, tmp_path, text_dir):
        """A checkpoint from elsewhere whose trainer state would run code when unpickled is refused, unrun."""
        cfg = _tiny(tmp_path, text_dir, steps=4)
        train(cfg, progress=False, stop_after=2)
        state = tmp_path / "checkpoint" / "trainer.pt"
        saved = torch.load(state, weights_only=True)
        marker = tmp_path / "code-ran"
        saved["rows"].append(_RunsCodeWhenUnpickled(marker))
        torch.save(saved, state)
        with pytest.raises(ValueError, match="never unpickled"):
            train(cfg, resume=True, progress=False)
        assert not marker.exists()

    def test_next_save_removes_what_a_killed_save_left(self, tmp_path, text_dir):
        cfg = _tiny(tmp_path, text_dir, steps=4, save_every=2)
        train(cfg, progress=False, stop_after=2)
        partial = tmp_path / "checkpoint.tmp"               # a save killed while writing its folder
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"torn")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        model = tmp_path / "model"
        model.mkdir()
        torn = model / f".model.safetensors.{dead}.0123abcd.tmp"   # killed inside the final save_pretrained
        torn.write_bytes(b"torn")
        train(cfg, resume=True, progress=False)
        assert not partial.exists() and not torn.exists()
        assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
        umask = os.umask(0)
        os.umask(umask)
        for f in (model / "model.safetensors", model / "config.json", tmp_path / "checkpoint" / "model.safetensors"):
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f

    def test_resume_from_a_moved_run_folder(self, tmp_path, text_dir):
        train(_tiny(tmp_path / "a", text_dir, steps=4), progress=False, stop_after=2)
        (tmp_path / "a").rename(tmp_path / "b")
        assert train(_tiny(tmp_path / "b", text_dir, steps=4), resume=True, progress=False)["step"] == 4

    def test_windows_longer_than_the_data_are_refused(self, tmp_path, text_dir):
        with pytest.raises(ValueError, match="--seq-len 10000000 needs more"):
            train(_tiny(tmp_path, text_dir, seq_len=10_000_000), progress=False)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickling ran code"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process(tmp_path, fixed_text_dir):
    """Two DDP processes (gloo) with half the batch each follow the single-process loss curve."""
    args = ["train", "--data", str(fixed_text_dir), "--d-model", "32", "--n-layers", "2", "--n-heads", "4",
            "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--warmup", "1", "--eval-every", "2",
            "--eval-tokens", "512", "--save-every", "4", "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sata.cli", *args, "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    logs = {k: json.loads((tmp_path / k / "log.json").read_text()) for k in ("ddp", "one")}
    assert logs["ddp"]["world_size"] == 2 and logs["one"]["world_size"] == 1
    for a, b in zip(logs["ddp"]["rows"], logs["one"]["rows"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if "val_bpb" in b:
            assert a["val_bpb"] == pytest.approx(b["val_bpb"], rel=1e-5)
    pa, pb = _params(tmp_path / "ddp"), _params(tmp_path / "one")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- generation
class TestGeneration:
    def test_greedy_generation_equals_argmax_of_full_recomputation(self):
        torch.manual_seed(0)
        m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4)).double().eval()
        toks = [s.token for s in generate(m, b"def f", 12, temperature=0)]
        seq = list(b"def f")
        for t in toks:
            with torch.no_grad():
                logits, _ = m(torch.tensor([seq]))
            assert int(logits[0, -1].argmax()) == t
            seq.append(t)

    def test_sata_state_stays_constant_softmax_cache_grows(self):
        torch.manual_seed(0)
        sizes = {}
        for attention in ("sata", "softmax"):
            m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4, attention=attention)).eval()
            steps = list(generate(m, b"x", 300, seed=1))
            sizes[attention] = (steps[0].state_bytes, steps[-1].state_bytes)
        assert sizes["sata"][0] == sizes["sata"][1]
        assert sizes["softmax"][1] > 8 * sizes["softmax"][0]

    def test_sampling_options(self):
        logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]]).repeat(2000, 1)
        g = torch.Generator().manual_seed(0)
        assert sample_next(logits[:1], temperature=0).item() == 3
        top2 = sample_next(logits, top_k=2, generator=g)
        assert set(top2.tolist()) == {2, 3}
        # top-p 0.6 keeps {3} (p=0.64) only
        assert set(sample_next(logits, top_p=0.6, generator=g).tolist()) == {3}
        assert set(sample_next(logits, top_p=0.85, generator=g).tolist()) == {2, 3}    # 0.64 + 0.23
        same = [sample_next(logits[:50], generator=torch.Generator().manual_seed(7)) for _ in range(2)]
        assert torch.equal(*same)

    @pytest.mark.parametrize("kw", [dict(top_p=1e-9), dict(temperature=1e-30), dict(temperature=1e-30, top_p=0.5)],
                             ids=["tiny-top-p", "tiny-temperature", "both"])
    def test_extreme_sampling_settings_fall_back_to_the_most_likely_token(self, kw):
        logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]]).repeat(100, 1)
        assert set(sample_next(logits, generator=torch.Generator().manual_seed(0), **kw).tolist()) == {3}

    @pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2)],
                             ids=["top-p-0", "top-p-above-1", "negative-temperature", "negative-top-k"])
    def test_bad_sampling_settings_are_refused(self, kw):
        with pytest.raises(ValueError, match="sample_next"):
            sample_next(torch.zeros(1, 5), **kw)

    def test_softmax_decoding_takes_the_unmasked_kernel_and_matches(self):
        torch.manual_seed(0)
        m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4, attention="softmax")).double().eval()
        seq = torch.randint(0, 256, (1, 20))
        with torch.no_grad():
            full, _ = m(seq)
            _, states = m(seq[:, :12], return_states=True)
            assert not any(s.has_padding for s in states)
            for t in range(12, 20):
                step, states = m(seq[:, t:t + 1], states, return_states=True)
                torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- command line
def test_cli_train_then_generate(tmp_path, text_dir, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--data", str(text_dir), "--out", str(out), "--d-model", "32", "--n-layers", "1",
                     "--n-heads", "4", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
                     "--eval-tokens", "256", "--no-progress"]) == 0
    assert "bits per byte" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and rows[-1]["val_bpb"]
    assert cli_main(["generate", str(out / "model"), "--tokens", "40", "--report-every", "20", "--prompt", "import "]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("import ")
    assert "ms/token" in cap.err and "tokens/s" in cap.err
    # the run's folder itself names its model too (the message of a wrong folder said to pass it, and it was refused)
    assert cli_main(["generate", str(out), "--tokens", "4", "--prompt", "import ", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("import ")


def test_printable_shows_control_characters_instead_of_sending_them():
    assert printable("a\x1b[31mb\rc\x07\x7f\x85d\n\te\u00e9") == "a\\x1b[31mb\\x0dc\\x07\\x7f\\x85d\n\te\u00e9"


def test_generate_keeps_text_and_measurements_apart_and_the_terminal_safe(tmp_path):
    """Near-uniform bytes (an untrained model, high temperature) hold control characters; with stdout and
    stderr on one terminal, the text comes out whole, escaped, and the measurements after it."""
    torch.manual_seed(0)
    TransformerLM(LMConfig(d_model=16, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "m")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "sata.cli", "generate", str(tmp_path / "m"), "--tokens", "300",
                        "--temperature", "100", "--report-every", "100", "--prompt", "START"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout
    header, _, rest = r.stdout.partition("START")
    assert header.startswith("# sata P=3") and "1 torch thread(s)" in header and header.count("\n") == 1
    text, _, table = rest.rpartition("\n# " + " " * 3 + "tokens")
    assert "ms/token" not in text and "\\x" in text                      # control bytes were generated, escaped
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", r.stdout)
    assert [line.split()[1] for line in table.splitlines()[1:4]] == ["100", "200", "300"]


@pytest.mark.parametrize("argv, match", [
    (["train", "--steps", "0"], "--steps must be a positive integer"),
    (["train", "--data", "/nonexistent/corpus"], "no such file or folder"),
    (["generate", "/nonexistent/model"], "does not hold a sata model"),
    (["generate", "MODEL", "--prompt", ""], "--prompt must hold at least one character"),
    (["generate", "MODEL", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "MODEL", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "MODEL", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["generate", "MODEL", "--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["generate", "MODEL", "--tokens", "0"], "--tokens must be >= 1"),
    (["train", "--lr", "inf"], "--lr must be a finite number"),
    (["train", "--lr", "1e38"], "--lr must be a finite number"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay >= 0"),
    (["train", "--window", "4", "--taylor-mix", "nan"], "taylor_mix must be a finite float"),
    (["train", "--recentre", "inf"], "recentre must be a finite float"),
    (["train", "--mix-lr", "0.03"], "--mix-lr sets the learning rate of the learned taylor_mix and recentre"),
    (["train", "--window", "4", "--learn-mix", "--mix-lr", "0"], "--mix-lr must be a finite learning rate > 0"),
    (["train", "--window", "4", "--learn-mix", "--mix-lr", "nan"], "--mix-lr must be a finite learning rate > 0"),
    (["train", "--threads", "0"], "--threads must be a positive integer"),
    (["train", "--out", "FILE"], "is a file; give a folder"),
    pytest.param(["train", "--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a machine with CUDA trains instead")),
    (["replicate", "--parts", ","], "--parts names no part"),
    (["replicate", "--threads", "0"], "--threads must be a positive integer"),
    (["replicate", "--memory-budget", "0"], "--memory-budget must be a positive size"),
    (["bench", "decode", "--max-memory", "foo"], "--max-memory must be a positive size"),
], ids=["steps", "data", "checkpoint", "empty-prompt", "top-p", "temperature", "temperature-nan", "top-p-nan", "tokens", "lr-inf", "lr-huge",
        "decay-nan", "decay-negative", "mix-nan", "recentre-inf", "mix-lr-unlearned", "mix-lr-0", "mix-lr-nan", "train-threads-0", "train-out-file", "train-cuda", "replicate-no-parts",
        "replicate-threads-0", "replicate-budget-0", "bench-max-memory"])
def test_cli_bad_arguments_exit_2_with_a_message(tmp_path, argv, match, capsys):
    if argv[0] in ("train", "replicate") and "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    if "MODEL" in argv:
        TransformerLM(LMConfig(d_model=16, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "m")
        argv = [str(tmp_path / "m") if a == "MODEL" else a for a in argv]
    assert cli_main(argv) == 2
    assert match in capsys.readouterr().err


def test_numpy_window_settings_become_python_numbers_in_the_config(tmp_path):
    """A sweep's numpy numbers are checked like Python's and stored as Python's: the config saves as JSON."""
    import numpy as np

    cfg = LMConfig(d_model=16, n_layers=1, n_heads=2, window=np.int64(4), sinks=np.int32(1), taylor_mix=np.float32(0.5))
    assert (type(cfg.window), type(cfg.sinks), type(cfg.taylor_mix)) == (int, int, float)
    TransformerLM(cfg).save_pretrained(tmp_path / "m")
    assert TransformerLM.from_pretrained(tmp_path / "m").config.window == 4


def test_a_bad_device_is_not_reported_as_a_damaged_checkpoint(tmp_path):
    TransformerLM(LMConfig(d_model=16, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "m")
    with pytest.raises(RuntimeError, match="device"):
        TransformerLM.from_pretrained(tmp_path / "m", map_location="nonsense")


@pytest.mark.parametrize("damage, match", [
    ("truncated-weights", "is not a readable safetensors file"),
    ("config-not-json", "is not valid JSON"),
    ("config-of-another-model", "does not hold the weights"),
])
def test_damaged_checkpoint_is_refused_with_the_file_named(tmp_path, capsys, damage, match):
    """A checkpoint folder whose files are damaged (a truncated copy, an edited config): a ValueError naming the
    file, and `sata generate` exits 2 with it (a raw safetensors or torch traceback before)."""
    folder = tmp_path / "m"
    TransformerLM(LMConfig(d_model=16, n_layers=1, n_heads=2)).save_pretrained(folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "config-not-json":
        config.write_text(config.read_text()[:-5])
    else:
        config.write_text(config.read_text().replace('"d_model": 16', '"d_model": 32'))
    with pytest.raises(ValueError, match=match):
        TransformerLM.from_pretrained(folder)
    assert cli_main(["generate", str(folder), "--tokens", "2"]) == 2
    assert match in capsys.readouterr().err
