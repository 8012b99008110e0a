"""WaveGlow: exact inverse, log-det against autograd, NVIDIA layout, weight import."""

import copy
import os
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

from vocoder.denoiser import Denoiser
from vocoder.errors import InputError
from vocoder.models.waveglow import WaveGlow
from vocoder.waveglow_import import (
    convert_nvidia_state_dict,
    read_nvidia_checkpoint,
)

N_MELS, HOP = 5, 16


def tiny(invconv="plain", n_group=8, weight_norm=True, dtype=torch.float64, **kw) -> WaveGlow:
    kw = {"n_flows": 4, "n_early_every": 2, "n_early_size": 2, "n_layers": 2,
          "n_channels": 8, **kw}
    model = WaveGlow(N_MELS, HOP, n_group=n_group, invconv=invconv, weight_norm=weight_norm,
                     **kw)
    # The end convs start at zero (identity couplings): randomise them or tests are trivial.
    for coupling in model.couplings:
        nn.init.normal_(coupling.net.end.weight, std=0.2)
        nn.init.normal_(coupling.net.end.bias, std=0.2)
    return model.to(dtype)


def batch(frames=3, size=1, dtype=torch.float64):
    return (0.3 * torch.randn(size, frames * HOP, dtype=dtype),
            torch.randn(size, N_MELS, frames, dtype=dtype))


@pytest.mark.parametrize("invconv", ["plain", "lu"])
@pytest.mark.parametrize("n_group,dtype,tol", [(4, torch.float32, 1e-4), (8, torch.float32, 1e-4),
                                               (8, torch.float64, 1e-10)])
def test_encode_decode_round_trip(invconv, n_group, dtype, tol):
    model = tiny(invconv, n_group, dtype=dtype)
    audio, mel = batch(size=2, dtype=dtype)
    z, log_det = model.encode(audio, mel)
    assert z.shape == audio.shape and log_det.shape == (2,)
    assert (z - audio).abs().max() > 0.1  # the flow does something
    assert (model.decode(z, mel) - audio).abs().max() < tol


@pytest.mark.parametrize("invconv", ["plain", "lu"])
def test_log_det_matches_autograd_jacobian(invconv):
    model = tiny(invconv)
    audio, mel = batch(frames=2)
    _, log_det = model.encode(audio, mel)
    jac = jacobian(lambda a: model.encode(a[None], mel)[0][0], audio[0])
    assert torch.allclose(log_det[0], torch.linalg.slogdet(jac)[1], atol=1e-9)


def test_log_prob_and_training_loss():
    model = tiny(dtype=torch.float32)
    audio, mel = batch(size=2, dtype=torch.float32)
    z, log_det = model.encode(audio, mel)
    n = audio.shape[1]
    expected = (torch.distributions.Normal(0.0, 0.5).log_prob(z).sum(1) + log_det)
    assert torch.allclose(model.log_prob(audio, mel, sigma=0.5), expected, atol=1e-3)
    loss, metrics = model.training_loss(audio, mel)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert metrics["nll"] == pytest.approx(loss.item())
    assert metrics["bits_per_sample"] == pytest.approx(loss.item() / 0.6931472 + 15, rel=1e-5)
    assert -model.log_prob(audio, mel).mean().item() / n == pytest.approx(loss.item(), abs=0.05)


@pytest.mark.parametrize("invconv", ["plain", "lu"])
def test_prepare_for_inference_keeps_outputs(invconv):
    model = tiny(invconv, dtype=torch.float32).eval()
    audio, mel = batch(size=2, dtype=torch.float32)
    z = torch.randn_like(audio)
    ema = copy.deepcopy(model)  # as a trainer keeps one; preparing the model must not touch it
    with torch.no_grad():
        before = model.decode(z, mel), model.log_prob(audio, mel)
        model.prepare_for_inference().prepare_for_inference()
        after = model.decode(z, mel), model.log_prob(audio, mel)
        assert torch.equal(ema.decode(z, mel), before[0])
    assert torch.allclose(after[0], before[0], atol=1e-5)
    assert torch.allclose(after[1], before[1], atol=1e-3)
    assert not any(n.endswith("weight_g") for n in model.state_dict())
    assert any(n.endswith("weight_g") for n in ema.state_dict())


def test_synthesize_length_sigma_and_dtypes():
    model = tiny(dtype=torch.float32).eval().prepare_for_inference()
    mel = torch.randn(2, N_MELS, 7)
    out = model.synthesize(mel)
    assert out.shape == (2, 7 * HOP) and torch.isfinite(out).all()
    assert torch.equal(model.synthesize(mel, sigma=0.0), model.synthesize(mel, sigma=0.0))
    reduced = model.to(torch.bfloat16).synthesize(mel.bfloat16(), sigma=0.0)
    assert reduced.dtype == torch.bfloat16 and reduced.shape == (2, 7 * HOP)
    with pytest.raises(ValueError, match="5"):
        model.synthesize(torch.randn(1, N_MELS + 1, 3))


def test_denoiser_removes_bias_of_silent_output():
    model = tiny(dtype=torch.float32).eval()
    denoiser = Denoiser(model, silence_level=-11.5, n_frames=24, n_fft=64, hop_length=16,
                        win_length=64)
    silent = model.synthesize(torch.full((1, N_MELS, 24), -11.5), sigma=0.0)
    cleaned = denoiser.denoise(silent, strength=1.0)
    assert cleaned.shape == silent.shape
    energy = [torch.stft(a, 64, 16, window=torch.hann_window(64), return_complex=True)
              .abs().square().sum() for a in (silent, cleaned)]
    assert energy[1] < 0.25 * energy[0]
    assert torch.allclose(denoiser(silent, strength=0.0), silent, atol=1e-5)


# ------------------------------------------------------------------- NVIDIA layout and import

def nvidia_state_dict(model: WaveGlow, weight_norm=True, layout="latest") -> dict:
    """Our model's weights under NVIDIA's names. ``layout``: "latest" (one cond_layer),
    "cond_layers" (one per layer) or "oldest" (also separate res_layers/skip_layers)."""
    sd = {"upsample.weight": model.upsample.weight, "upsample.bias": model.upsample.bias}
    n_ch = model.n_channels

    def put(name, conv, rows=slice(None)):
        if weight_norm:
            sd[f"{name}.weight_g"] = conv.weight_g[rows]
            sd[f"{name}.weight_v"] = conv.weight_v[rows]
        else:
            sd[f"{name}.weight"] = conv.effective_weight()[rows]
        sd[f"{name}.bias"] = conv.bias[rows]

    for i, (inv, coupling) in enumerate(zip(model.invconvs, model.couplings, strict=True)):
        sd[f"convinv.{i}.conv.weight"] = inv.weight_matrix()[..., None]
        net, p = coupling.net, f"WN.{i}"
        put(f"{p}.start", net.start)
        for j in range(net.n_layers):
            put(f"{p}.in_layers.{j}", net.in_layers[j])
            if layout == "latest":
                continue
            put(f"{p}.cond_layers.{j}", net.cond_layer, slice(2 * n_ch * j, 2 * n_ch * (j + 1)))
            if layout == "oldest":
                last = j == net.n_layers - 1
                skip_rows = slice(0 if last else n_ch, None)
                put(f"{p}.skip_layers.{j}", net.res_skip_layers[j], skip_rows)
                if not last:
                    put(f"{p}.res_layers.{j}", net.res_skip_layers[j], slice(0, n_ch))
        if layout == "latest":
            put(f"{p}.cond_layer", net.cond_layer)
        if layout != "oldest":
            for j in range(net.n_layers):
                put(f"{p}.res_skip_layers.{j}", net.res_skip_layers[j])
        sd[f"{p}.end.weight"], sd[f"{p}.end.bias"] = net.end.weight, net.end.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def reference_infer(sd, mel, z_final, z_early, n_group, n_early_every, n_layers, n_flows):
    """NVIDIA's published inference written out independently from NVIDIA-named weights:
    noise ``z_final`` for the last flow and ``z_early[k]`` prepended after flow ``k``."""
    def weight(name):
        if f"{name}.weight" in sd:
            return sd[f"{name}.weight"]
        v = sd[f"{name}.weight_v"]
        return sd[f"{name}.weight_g"] * v / v.norm(dim=(1, 2), keepdim=True)

    def conv(name, x, **kw):
        return F.conv1d(x, weight(name), sd[f"{name}.bias"], **kw)

    up_w = sd["upsample.weight"]
    spect = F.conv_transpose1d(mel, up_w, sd["upsample.bias"], stride=HOP)
    spect = spect[:, :, :-(up_w.shape[-1] - HOP)]
    b = spect.shape[0]
    spect = spect.unfold(2, n_group, n_group).permute(0, 2, 1, 3).reshape(b, -1, N_MELS * n_group)
    spect = spect.permute(0, 2, 1)
    audio = z_final
    for k in reversed(range(n_flows)):
        p, n_half = f"WN.{k}", audio.shape[1] // 2
        h, cond = conv(f"{p}.start", audio[:, :n_half]), conv(f"{p}.cond_layer", spect)
        n_ch, skips = h.shape[1], 0
        for i in range(n_layers):
            acts = conv(f"{p}.in_layers.{i}", h, dilation=2**i, padding=2**i)
            acts = acts + cond[:, 2 * n_ch * i:2 * n_ch * (i + 1)]
            acts = torch.tanh(acts[:, :n_ch]) * torch.sigmoid(acts[:, n_ch:])
            res_skip = conv(f"{p}.res_skip_layers.{i}", acts)
            if i < n_layers - 1:
                h = h + res_skip[:, :n_ch]
                res_skip = res_skip[:, n_ch:]
            skips = skips + res_skip
        out = conv(f"{p}.end", skips)
        shift, log_s = out[:, :n_half], out[:, n_half:]
        audio = torch.cat([audio[:, :n_half], (audio[:, n_half:] - shift) / torch.exp(log_s)], 1)
        w = sd[f"convinv.{k}.conv.weight"][:, :, 0]
        audio = F.conv1d(audio, torch.linalg.inv(w)[..., None])
        if k % n_early_every == 0 and k > 0:
            audio = torch.cat([z_early[k], audio], 1)
    return audio.permute(0, 2, 1).reshape(b, -1)


def test_nvidia_layout_matches_reference_inference():
    model = tiny(audio_scale=1.0)  # NVIDIA's models read raw audio
    frames, g = 3, model.n_group
    mel = torch.randn(2, N_MELS, frames, dtype=torch.float64)
    n_pos = frames * HOP // g
    z_early = {k: torch.randn(2, 2, n_pos, dtype=torch.float64) for k in (2,)}
    z_final = torch.randn(2, model.flow_channels[-1], n_pos, dtype=torch.float64)
    expected = reference_infer(nvidia_state_dict(model), mel, z_final, z_early, g, 2, 2, 4)
    # Documented layout: early outputs in flow order, then the final channels, un-squeezed.
    z = torch.cat([z_early[2], z_final], 1).permute(0, 2, 1).reshape(2, -1)
    assert torch.allclose(model.decode(z, mel), expected, atol=1e-10)
    # Another audio_scale only rescales the audio: the flows between are unchanged.
    scaled = tiny(audio_scale=0.25)
    scaled.load_state_dict(model.state_dict())
    assert torch.allclose(scaled.decode(z, mel), 0.25 * expected, atol=1e-10)


@pytest.mark.parametrize("weight_norm,layout", [(True, "latest"), (False, "latest"),
                                                (True, "cond_layers"), (True, "oldest"),
                                                (False, "oldest")])
def test_convert_state_dict_round_trip(tmp_path, weight_norm, layout):
    model = tiny(dtype=torch.float32, n_early_every=3, n_flows=5, audio_scale=1.0).eval()
    # A plain state dict file, saved from a DistributedDataParallel wrapper.
    sd = {f"module.{k}": v for k, v in nvidia_state_dict(model, weight_norm, layout).items()}
    torch.save({"state_dict": sd}, tmp_path / "sd.pt")
    arch, ours = convert_nvidia_state_dict(read_nvidia_checkpoint(tmp_path / "sd.pt"),
                                           hop_length=HOP)
    assert arch["weight_norm"] == weight_norm
    for key in ("n_flows", "n_group", "n_early_every", "n_early_size", "n_layers",
                "n_channels", "kernel_size", "upsample_kernel"):
        assert arch[key] == model.arch_config()[key], key
    converted = WaveGlow(N_MELS, HOP, **arch).eval()
    converted.load_state_dict(ours)
    audio, mel = batch(size=2, dtype=torch.float32)
    z = torch.randn_like(audio)
    with torch.no_grad():
        assert torch.allclose(converted.decode(z, mel), model.decode(z, mel), atol=1e-5)
        assert torch.allclose(converted.log_prob(audio, mel), model.log_prob(audio, mel),
                              atol=1e-3)


def test_convert_rejects_foreign_state_dict():
    with pytest.raises(ValueError, match="convinv"):
        convert_nvidia_state_dict({"upsample.weight": torch.zeros(2, 2, 4),
                                   "upsample.bias": torch.zeros(2)})


def _save_nvidia_object(sd, path, legacy, extra=None):
    """Pickle a whole-model object the way NVIDIA's train.py did, from stand-in ``glow``
    classes that exist only while saving."""
    glow = types.ModuleType("glow")
    for name in ("WaveGlow", "WN", "Invertible1x1Conv"):
        setattr(glow, name, type(name, (nn.Module,), {"__module__": "glow"}))
    sys.modules["glow"] = glow
    try:
        def conv(prefix, **kw):
            normed = f"{prefix}.weight_v" in sd
            w = sd[f"{prefix}.weight_v" if normed else f"{prefix}.weight"]
            layer = nn.Conv1d(w.shape[1], w.shape[0], w.shape[2], **kw)
            return nn.utils.weight_norm(layer) if normed else layer

        model = glow.WaveGlow()
        up = sd["upsample.weight"]
        model.upsample = nn.ConvTranspose1d(up.shape[0], up.shape[1], up.shape[2], stride=HOP)
        model.WN, model.convinv = nn.ModuleList(), nn.ModuleList()
        n_flows = sum(1 for k in sd if k.startswith("convinv."))
        n_layers = sum(1 for k in sd if k.startswith("WN.0.in_layers.") and k.endswith("bias"))
        for i in range(n_flows):
            inv = glow.Invertible1x1Conv()
            c = sd[f"convinv.{i}.conv.weight"].shape[0]
            inv.conv = nn.Conv1d(c, c, 1, bias=False)
            wn = glow.WN()
            wn.n_layers, wn.n_channels = n_layers, sd[f"WN.{i}.end.weight"].shape[1]
            wn.start, wn.cond_layer = conv(f"WN.{i}.start"), conv(f"WN.{i}.cond_layer")
            wn.in_layers = nn.ModuleList(
                conv(f"WN.{i}.in_layers.{j}", dilation=2**j, padding=2**j)
                for j in range(n_layers))
            wn.res_skip_layers = nn.ModuleList(conv(f"WN.{i}.res_skip_layers.{j}")
                                               for j in range(n_layers))
            wn.end = conv(f"WN.{i}.end")
            model.WN.append(wn)
            model.convinv.append(inv)
        model.load_state_dict(sd)
        if extra is not None:
            model.evil = extra
        with warnings.catch_warnings():  # "couldn't retrieve source code" of the stand-ins
            warnings.simplefilter("ignore")
            torch.save({"model": model, "iteration": 12, "learning_rate": 1e-4}, path,
                       _use_new_zipfile_serialization=not legacy)
    finally:
        del sys.modules["glow"]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("weight_norm", [True, False])
def test_convert_whole_object_checkpoint(tmp_path, legacy, weight_norm):
    model = tiny(dtype=torch.float32, audio_scale=1.0).eval()
    sd = nvidia_state_dict(model, weight_norm)
    src = tmp_path / "waveglow.pt"
    _save_nvidia_object(sd, src, legacy)
    assert "glow" not in sys.modules
    read = read_nvidia_checkpoint(src)
    assert set(read) == set(sd)
    assert all(torch.equal(read[k], sd[k]) for k in sd)
    arch, ours = convert_nvidia_state_dict(read, hop_length=HOP)
    converted = WaveGlow(N_MELS, HOP, **arch).eval()
    converted.load_state_dict(ours)
    audio, mel = batch(size=1, dtype=torch.float32)
    z = torch.randn_like(audio)
    with torch.no_grad():
        assert torch.allclose(converted.decode(z, mel), model.decode(z, mel), atol=1e-5)
        assert torch.allclose(converted.log_prob(audio, mel), model.log_prob(audio, mel),
                              atol=1e-3)


def test_convert_waveglow_writes_loadable_checkpoint(tmp_path, capsys):
    from vocoder.checkpoint import load_checkpoint
    from vocoder.cli.convert import main
    from vocoder.models import model_from_checkpoint

    model = WaveGlow(80, 256, n_flows=2, n_group=8, n_early_every=4, n_layers=2,
                     n_channels=8, audio_scale=1.0).eval()
    src, out = tmp_path / "nvidia.pt", tmp_path / "ckpt.pt"
    _save_nvidia_object(nvidia_state_dict(model), src, legacy=True)
    main([f"input={src}", f"output={out}"])
    assert "wrote" in capsys.readouterr().out
    ckpt = load_checkpoint(out, kind="waveglow")  # what vocoder.load_model does, sans librosa
    assert ckpt["features"]["name"] == "tacotron2" and ckpt["arch"]["n_flows"] == 2
    loaded = model_from_checkpoint(ckpt).eval().prepare_for_inference()
    mel = torch.randn(1, 80, 3)
    z = torch.randn(1, 3 * 256)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(z, mel), model.decode(z, mel), atol=1e-5)


def test_convert_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from vocoder.cli.convert import main

    bad, out = tmp_path / "broken.pt", tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    for argv in ([f"input={bad}", f"output={out}"], [f"input={tmp_path / 'none.pt'}",
                                                      f"output={out}"], ["input=x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil(_Evil):
    def __reduce__(self):
        return (eval, (f"__import__('os').system({self.command!r})",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_not_executed(tmp_path, legacy):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(f"touch {marker}"), "x": _EvalEvil(f"touch {marker}")}, evil,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(InputError, match="no model weights"):
        read_nvidia_checkpoint(evil)
    # Hidden inside a real model object: the weights still come out, the payload never runs.
    model = tiny(dtype=torch.float32)
    inside = tmp_path / "inside.pt"
    _save_nvidia_object(nvidia_state_dict(model), inside, legacy, extra=_Evil(f"touch {marker}"))
    assert "WN.0.start.weight_v" in read_nvidia_checkpoint(inside)
    assert not marker.exists()
