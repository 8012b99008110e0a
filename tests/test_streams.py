"""Streaming synthesis (vocoder/models/streams.py, vocoder/nn/streaming.py): pieces pushed in
any chunking concatenate to whole-utterance synthesis with the same noise (student, teacher),
or to something close with stated seams (WaveGlow)."""

from __future__ import annotations

import pytest
import torch

import vocoder
from vocoder.data.demo import generate_utterance
from vocoder.nn.parallel import ParallelWork
from vocoder.nn.streaming import ConditioningStream
from vocoder.nn.wavenet import MelUpsampler

HOP = 256


def _speech_mel(model, frames: int, batch: int = 2) -> torch.Tensor:
    """Log-mels of demo utterances (voiced, with pauses) through the model's own front end."""
    mels = []
    for i in range(batch):
        audio = torch.from_numpy(generate_utterance(i).audio).float()
        mels.append(model.features(audio[None, : frames * HOP])[..., :frames])
    return torch.cat(mels)


def _trained_like(kind: str, **arch):
    """A debug-size model with weights moved off their initial values (a fresh student is an
    identity and a fresh WaveGlow nearly so)."""
    model = vocoder.build_model(kind, preset="tacotron2", experiment="debug", **arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _streamed(stream, mel: torch.Tensor, z: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    pieces, begin = [], 0
    for size in chunks:
        pieces.append(stream.push(mel[..., begin:begin + size],
                                  z[:, begin * HOP:(begin + size) * HOP]))
        begin += size
    assert begin == mel.shape[-1]
    pieces.append(stream.flush())
    return pieces


CHUNKINGS = {"one frame": [1] * 13, "uneven": [2, 5, 1, 1, 4], "whole": [13]}


@pytest.mark.parametrize("hop,frame_context", [(256, 0), (256, 1), (300, 2)])
def test_conditioning_stream_equals_the_upsampler_on_the_whole_mel(hop, frame_context):
    upsampler = MelUpsampler(8, hop, 6, frame_context=frame_context).double()
    with torch.no_grad():  # not box filters: every tap and edge effect counts
        for smoother in upsampler.smoothers:
            smoother.weight.normal_()
    mel = torch.randn(2, 8, 17, dtype=torch.float64)
    whole = upsampler(mel)
    lookahead = upsampler.lookahead_frames
    assert lookahead == frame_context + 2
    for chunks in ([1] * 17, [3, 1, 7, 6], [17]):
        stream, pieces, begin = ConditioningStream(upsampler), [], 0
        for size in chunks:
            piece = stream.push(mel[..., begin:begin + size])
            begin += size
            # Exactly the frames with `lookahead` frames after them are handed out.
            assert sum(p.shape[-1] for p in pieces) + piece.shape[-1] == \
                max(0, begin - lookahead) * hop
            pieces.append(piece)
            assert stream.frames.shape[-1] <= lookahead + stream.margin + max(chunks)
        pieces.append(stream.flush())
        torch.testing.assert_close(torch.cat(pieces, -1), whole, rtol=0, atol=1e-12)


def test_parallel_stack_state_makes_pieces_equal_the_whole_signal():
    model = _trained_like("student").double()
    mel = torch.randn(2, 80, 11, dtype=torch.float64) - 5
    z = torch.randn(2, 11 * HOP, dtype=torch.float64)
    flows = model._parallel_flows(z.device, z.dtype)
    whole = flows[0](z, ParallelWork(model.upsampler, flows, mel)).clone()
    state = flows[0].initial_state(2)
    pieces = []
    for a, b in [(0, 1), (1, 5), (5, 6), (6, 11)]:  # frames, with the whole mel as context
        work = ParallelWork(model.upsampler, flows, mel, emit=(a, b))
        pieces.append(flows[0](z[:, a * HOP:b * HOP], work, state).clone())
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=0, atol=1e-12)
    # The state is the last inputs of each layer: its longest tap, whatever came before.
    layers = flows[0].baked.layers
    assert state.inputs.shape == (2, max(s for s, _ in layers[0].taps), 2)
    assert [t.shape[1] for t in state.layers[1:]] == [max(s for s, _ in layer.taps)
                                                      for layer in layers[1:]]


@pytest.mark.parametrize("kind", ["student", "teacher"])
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_causal_streams_equal_whole_synthesis(kind, chunking):
    model = _trained_like(kind)
    mel = _speech_mel(model, 13)
    z = torch.randn(2, 13 * HOP)
    whole = model.synthesize(mel, sigma=0.8, z=z)
    assert whole.abs().max() > 1e-3  # not a silent model
    stream = model.stream(sigma=0.8)
    assert stream.exact and stream.lookahead_frames == 3
    pieces = _streamed(stream, mel, z, CHUNKINGS[chunking])
    torch.testing.assert_close(torch.cat(pieces, -1), whole, rtol=0, atol=1e-5)
    if chunking == "one frame":  # a frame comes out once `lookahead` more have arrived
        assert [p.shape[-1] for p in pieces[:5]] == [0, 0, 0, HOP, HOP]
        assert pieces[-1].shape[-1] == 3 * HOP


def test_student_stream_state_is_bounded_by_the_receptive_field():
    model = _trained_like("student")
    stream = model.stream()
    mel = _speech_mel(model, 13, batch=1)
    for i in range(13):
        stream.push(mel[..., i:i + 1])
    for flow, state in zip(model.flows, stream._states, strict=True):
        # The first layer's past rows (x, 1) and every later layer's past inputs: exactly
        # the receptive field behind the current sample, whatever the stream's length.
        kept = state.inputs.shape[1] + sum(s.shape[1] for s in state.layers[1:])
        assert kept == flow.receptive_field - 1


def test_stream_draws_noise_when_none_is_given_and_checks_its_input():
    model = _trained_like("student")
    mel = _speech_mel(model, 6)
    stream = model.stream()
    out = torch.cat([stream.push(mel[..., :4]), stream.push(mel[..., 4:]), stream.flush()], -1)
    assert out.shape == (2, 6 * HOP) and torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="flushed"):
        stream.push(mel)
    stream = model.stream()
    with pytest.raises(ValueError, match="z must be"):
        stream.push(mel[..., :2], torch.randn(2, 3 * HOP))
    stream.push(mel[..., :2])
    with pytest.raises(ValueError, match="batch 2"):
        stream.push(mel[:1, :, 2:4])
    with pytest.raises(ValueError, match="f >= 1"):
        stream.push(mel[..., :0])
    empty = model.stream().flush()
    assert empty.numel() == 0


@pytest.mark.parametrize("excitation", [None, True])
def test_waveglow_chunked_stream_is_close_and_exact_with_a_whole_utterance_of_context(excitation):
    # With excitation, each window continues the source's phase from the frames before it.
    model = _trained_like("waveglow", n_flows=2, n_early_every=1, n_layers=2, n_channels=8,
                          excitation=excitation)
    mel = _speech_mel(model, 13)
    z = torch.randn(2, 13 * HOP)
    whole = model.synthesize(mel, z=z)
    # Context covering the utterance: every window is the whole mel.
    wide = model.stream(context_frames=13)
    assert not wide.exact and wide.lookahead_frames == 13
    torch.testing.assert_close(torch.cat(_streamed(wide, mel, z, [2, 5, 6]), -1), whole)
    # No context: each one-frame window is synthesised alone, and the seams show.
    bare = torch.cat(_streamed(model.stream(context_frames=0), mel, z, [1] * 13), -1)
    assert bare.shape == whole.shape
    seam_error = (bare - whole).abs().max() / whole.abs().max()
    assert seam_error > 1e-3
    # With context beyond the model's reach the error falls.
    near = torch.cat(_streamed(model.stream(context_frames=4), mel, z, [1] * 13), -1)
    assert (near - whole).abs().max() / whole.abs().max() < seam_error
