"""The shared trainer: checkpoints, exact resume, interruption, numerical faults, DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vocoder.checkpoint import CheckpointError, load_checkpoint
from vocoder.cli.common import CONF_DIR, front_end
from vocoder.data.corpus import prepare_corpus
from vocoder.errors import VocoderError
from vocoder.models import model_from_arch
from vocoder.training.state import seed_everything
from vocoder.training.trainer import NonFiniteError, Trainer, TrainingLoss

REPO = Path(__file__).resolve().parents[1]


def _cfg(run_dir, cache_dir, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(
            "config",
            overrides=[
                "experiment=debug",
                f"run_dir={run_dir}",
                f"data.cache_dir={cache_dir}",
                "data.n_utterances=8",
                "trainer.device=cpu",
                "trainer.log_every=1",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = _cfg(cache / "unused", cache)
    prepare_corpus(cfg.data, front_end(cfg), cache, 8 * 256, log=lambda s: None, progress=False)
    return cache


def _trainer(run_dir, cache_dir, *overrides, make_objective=TrainingLoss):
    cfg = _cfg(run_dir, cache_dir, *overrides)
    fe = front_end(cfg)
    corpus = prepare_corpus(cfg.data, fe, cache_dir, 8 * 256, log=lambda s: None, progress=False)
    seed_everything(int(cfg.seed))
    model = model_from_arch("teacher", fe.n_mels, fe.hop_length, dict(cfg.arch.teacher))
    return Trainer(
        cfg, model, corpus, fe.config.to_dict(), make_objective=make_objective, log=lambda s: None
    )


def _losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_resume_equals_uninterrupted(tmp_path, cache_dir):
    common = (
        "trainer.schedule=constant",
        "trainer.warmup_steps=3",
        "trainer.val_every=100",
        "trainer.ckpt_every=100",
    )
    one_go = _trainer(tmp_path / "a", cache_dir, "trainer.max_steps=6", *common)
    one_go.fit()
    first = _trainer(tmp_path / "b", cache_dir, "trainer.max_steps=3", *common)
    first.fit()
    assert load_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 3
    resumed = _trainer(tmp_path / "b", cache_dir, "trainer.max_steps=6", *common)
    resumed.fit()
    assert resumed.step == 6
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6)
    for (k, a), b in zip(
        one_go.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(one_go.ema_model.parameters(), resumed.ema_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_short_training_on_the_demo_corpus_lowers_validation_nll(tmp_path, cache_dir):
    from vocoder.data.dataset import validation_batches

    t = _trainer(tmp_path, cache_dir, "trainer.max_steps=30", "trainer.val_every=30",
                 "trainer.lr=3e-3", "trainer.warmup_steps=0")
    batches = validation_batches(t.corpus, "valid", 4, 16, 4)
    torch.manual_seed(0)
    before = t.validate(batches)["nll"]
    after = t.fit()["nll"]
    assert after < before - 0.3, (before, after)


def test_checkpoint_rotation_best_and_contents(tmp_path, cache_dir):
    t = _trainer(
        tmp_path,
        cache_dir,
        "trainer.max_steps=8",
        "trainer.ckpt_every=2",
        "trainer.keep_last=2",
        "trainer.val_every=4",
    )
    metrics = t.fit()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert ckpts == ["best.pt", "last.pt", "step_00000006.pt", "step_00000008.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "config", "features", "arch"):
        assert key in ckpt
    assert ckpt["kind"] == "teacher" and ckpt["step"] == 8
    assert ckpt["features"]["name"] == "tacotron2"
    assert ckpt["config"]["trainer"]["max_steps"] == 8
    assert set(metrics) >= {"loss", "nll"}


def test_wrong_kind_preset_or_version_is_refused(tmp_path, cache_dir):
    t = _trainer(tmp_path, cache_dir, "trainer.max_steps=2")
    t.fit()
    path = tmp_path / "checkpoints/last.pt"
    with pytest.raises(CheckpointError, match="expected a waveglow"):
        load_checkpoint(path, kind="waveglow")
    ckpt = torch.load(path, weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer than this toolkit"):
        load_checkpoint(tmp_path / "future.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    other = _trainer(tmp_path, cache_dir, "trainer.max_steps=4", "features=hifigan")
    with pytest.raises(VocoderError, match="mel preset"):
        other.fit()


class _PoisonedLoss(TrainingLoss):
    """Returns NaN on the steps listed in ``poison`` (counted in calls while training)."""

    def __init__(self, model, poison):
        super().__init__(model)
        self.poison, self.calls = poison, 0

    def forward(self, audio, mel):
        loss, metrics = super().forward(audio, mel)
        if self.training:
            self.calls += 1
            if self.calls in self.poison:
                loss = loss * float("nan")
        return loss, metrics


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, cache_dir):
    t = _trainer(
        tmp_path / "skip",
        cache_dir,
        "trainer.max_steps=4",
        "trainer.val_every=100",
        make_objective=lambda m: _PoisonedLoss(m, poison={2}),
    )
    t.fit()
    assert t.step == 4 and t.nonfinite_total == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())

    t = _trainer(
        tmp_path / "stop",
        cache_dir,
        "trainer.max_steps=50",
        "trainer.max_nonfinite=3",
        "trainer.ckpt_every=2",
        "trainer.val_every=100",
        make_objective=lambda m: _PoisonedLoss(m, poison=set(range(3, 100))),
    )
    with pytest.raises(NonFiniteError, match="learning rate"):
        t.fit()
    ckpt = load_checkpoint(tmp_path / "stop/checkpoints/last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _train_cmd(run_dir, cache_dir, *extra):
    return [
        sys.executable,
        "-m",
        "vocoder.cli.train",
        "model=teacher",
        "experiment=debug",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "data.n_utterances=8",
        "trainer.device=cpu",
        *extra,
    ]


def _wait_for(path, proc, timeout=120):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.2)


def test_sigterm_saves_and_sigkill_leaves_a_loadable_checkpoint(tmp_path, cache_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _train_cmd(
        tmp_path,
        cache_dir,
        "trainer.max_steps=100000",
        "trainer.ckpt_every=5",
        "trainer.val_every=100000",
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    _wait_for(tmp_path / "checkpoints/last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = load_checkpoint(tmp_path / "checkpoints/last.pt")["step"]
    assert step >= 5

    # kill -9 at an arbitrary moment: the last complete checkpoint still loads, and the same
    # command resumes from it.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    next_save = (step // 5 + 1) * 5
    _wait_for(tmp_path / f"checkpoints/step_{next_save:08d}.pt", proc)
    proc.kill()
    proc.communicate()
    # The kill may land between writing step_N.pt and last.pt: last.pt is then the previous
    # complete checkpoint, which is exactly the guarantee.
    killed_at = load_checkpoint(tmp_path / "checkpoints/last.pt")["step"]
    assert killed_at == step or killed_at >= next_save
    done = subprocess.run(
        _train_cmd(
            tmp_path,
            cache_dir,
            f"trainer.max_steps={killed_at + 2}",
            "trainer.ckpt_every=5",
            "trainer.val_every=100000",
        ),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed from {tmp_path / 'checkpoints/last.pt'} at step {killed_at}" in done.stdout
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == killed_at + 2


DDP_SCRIPT = """
import sys, torch
from hydra import compose, initialize_config_dir
from vocoder.cli.common import CONF_DIR, front_end, prepare_data
from vocoder.models import model_from_arch
from vocoder.training.trainer import Trainer
run_dir, cache_dir = sys.argv[1], sys.argv[2]
with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
    cfg = compose("config", overrides=["experiment=debug", f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}", "data.n_utterances=8", "trainer.device=cpu",
        "trainer.max_steps=3", "trainer.val_every=3"])
fe = front_end(cfg)
corpus = prepare_data(cfg, fe, 8 * 256)
model = model_from_arch("teacher", fe.n_mels, fe.hop_length, dict(cfg.arch.teacher))
t = Trainer(cfg, model, corpus, fe.config.to_dict(), log=lambda s: None)
t.fit()
torch.save(t.model.state_dict(), f"{run_dir}/rank{t.dist.rank}.pt")
"""


def test_two_process_gloo_ranks_stay_identical(tmp_path, cache_dir):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(script),
            str(tmp_path),
            str(cache_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = model_from_arch("teacher", 80, 256, {})  # a differently-sized net: keys differ
    assert set(r0) == set(r1) and set(r0) != set(initial.state_dict())
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)
    # only rank 0 wrote the run's files, and training moved the weights
    assert (tmp_path / "checkpoints/last.pt").exists()
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["step"] == 3
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])


def test_resume_with_changed_settings_says_so_and_applies_them(tmp_path, cache_dir):
    common = ("trainer.schedule=constant", "trainer.warmup_steps=0", "trainer.val_every=100",
              "trainer.ckpt_every=100")
    _trainer(tmp_path, cache_dir, "trainer.max_steps=2", "trainer.lr=2e-3", *common).fit()
    lines = []
    cfg = _cfg(tmp_path, cache_dir, "trainer.max_steps=3", "trainer.lr=5e-4",
               "trainer.betas=[0.8,0.99]", *common)
    fe = front_end(cfg)
    corpus = prepare_corpus(cfg.data, fe, cache_dir, 8 * 256, log=lambda s: None, progress=False)
    model = model_from_arch("teacher", fe.n_mels, fe.hop_length, dict(cfg.arch.teacher))
    trainer = Trainer(cfg, model, corpus, fe.config.to_dict(), log=lines.append)
    assert trainer.resume()
    said = [line for line in lines if line.startswith("resume:")]
    assert said == ["resume: trainer.max_steps 2 -> 3 (applied)",
                    "resume: trainer.lr 0.002 -> 0.0005 (applied)",
                    "resume: trainer.betas (0.9, 0.999) -> (0.8, 0.99) (applied)"]
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(5e-4) and group["betas"] == (0.8, 0.99)
    trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize("override,message", [
    ("trainer.schedule=linear", "trainer.schedule=linear: must be one of"),
    ("trainer.batch_size=0", "trainer.batch_size=0: must be a positive integer"),
    ("trainer.lr=fast", "trainer.lr=fast: must be of type float"),
    ("+trainer.learning_rate=1e-3", "unknown trainer setting(s): learning_rate"),
    ("trainer.pitch_sigma=0", "trainer.pitch_sigma=0.0: must be positive, or null"),
])
def test_bad_trainer_settings_fail_in_one_line(tmp_path, cache_dir, override, message):
    from vocoder.errors import VocoderError
    from vocoder.training.settings import TrainerSettings

    with pytest.raises(VocoderError) as info:
        TrainerSettings.from_config(_cfg(tmp_path, cache_dir, override).trainer)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_pitch_is_measured_during_training(tmp_path, cache_dir):
    trainer = _trainer(tmp_path, cache_dir, "trainer.max_steps=2", "trainer.val_every=2",
                       "trainer.pitch_every=2", "trainer.pitch_segments=2",
                       "trainer.pitch_frames=8")
    trainer.fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    (pitch,) = [r for r in rows if r["kind"] == "pitch"]
    assert pitch["step"] == 2
    assert 0.5 < pitch["pitch_periodicity_reference"] <= 1.0  # the demo corpus is voiced
    assert -1.0 <= pitch["pitch_periodicity"] < pitch["pitch_periodicity_reference"]
    assert 0.0 <= pitch["pitch_voicing_error"] <= 1.0
    # the teacher's NLL split by voicing (a short middle segment may hold no unvoiced frame)
    assert math.isfinite(pitch["nll_voiced"]) and "nll_unvoiced" in pitch


def test_pitch_probe_samples_at_the_configured_temperature(tmp_path, cache_dir):
    trainer = _trainer(tmp_path, cache_dir, "trainer.max_steps=2", "trainer.val_every=2",
                       "trainer.pitch_every=2", "trainer.pitch_segments=1",
                       "trainer.pitch_frames=8", "trainer.pitch_sigma=0.25")
    sigmas = []
    original = trainer.ema_model.synthesize

    def record(mel, sigma=None, **kw):
        sigmas.append(sigma)
        return original(mel, sigma=sigma, **kw)

    trainer.ema_model.synthesize = record
    trainer.fit()
    assert sigmas == [0.25]


def test_trainer_tells_the_model_its_progress_before_each_step(tmp_path, cache_dir):
    # The teacher's input-noise cut-off reads the share of training done from this call.
    t = _trainer(tmp_path, cache_dir, "trainer.max_steps=4", "trainer.val_every=100",
                 "trainer.ckpt_every=100", "+arch.teacher.input_noise=0.01",
                 "+arch.teacher.input_noise_until=0.5")
    seen = []
    original = t.model.set_training_progress

    def record(step, max_steps):
        seen.append((step, max_steps))
        original(step, max_steps)

    t.model.set_training_progress = record
    t.fit()
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert t.model._noise_now() == 0.0  # 3/4 >= 0.5: past the cut-off
    t.model.set_training_progress(1, 4)
    assert t.model._noise_now() == 0.01
