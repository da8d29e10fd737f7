"""Same weights in, same numbers out: our NVIL AIR against Pyro's AIR example, piece by piece.

Builds Pyro's model (examples/air/air.py, the tutorial's settings) and ours (ModelConfig
defaults, the `nvil` estimator), copies every Pyro weight into ours (LSTM, presence/where head,
encoder, decoder, baseline LSTM and head), runs Pyro's guide and model on a batch of our training
images, replays exactly Pyro's samples through ours, and prints what agrees and what does not:

* generative model and guide: log p(x | z), presence probabilities, z_what posterior, decoder
  gradient (Pyro's surrogate loss is N/B times a sum over the batch, ours a mean: ratio N);
* the z_where posterior sd at initialisation (Pyro: softplus(out) * prior sd; ours: softplus(out)
  with the head's bias set so that it starts at `where_scale_init`);
* the NVIL learning signal: Pyro's downstream cost of each z_pres site (captured from
  pyro.infer.tracegraph_elbo._construct_baseline) against the per-image downstream ELBO built from
  Pyro's own trace, which shows the N/B factor that Pyro's baseline regresses.

Pyro's code is imported from the fetched repository given on the command line, never copied:

    python docs/pyro_parity/compare.py --pyro-air /work/pyro_src/examples/air
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_pyro import build_pyro_air, import_pyro_air, train_images  # noqa: E402

from implementations.core.estimators import NVIL  # noqa: E402
from implementations.core.model import AIR, ModelConfig, Noise  # noqa: E402

N_TRAIN, BATCH = 60000, 64


def copy_lstm(ours: torch.nn.Module, cell: torch.nn.LSTMCell, pixels: int) -> None:
    """Pyro's LSTMCell over [image, z_where, z_what, z_pres] -> our ImageLSTM (same gates)."""
    with torch.no_grad():
        ours.image_weight.copy_(cell.weight_ih[:, :pixels].t())
        ours.image_bias.copy_(cell.bias_ih + cell.bias_hh)
        ours.recurrent.weight.copy_(torch.cat([cell.weight_ih[:, pixels:], cell.weight_hh], 1))


def copy_mlp(ours: torch.nn.Sequential, seq: torch.nn.Sequential, bias_add=None) -> None:  # noqa: ANN001
    linear_o = [m for m in ours if isinstance(m, torch.nn.Linear)]
    linear_p = [m for m in seq if isinstance(m, torch.nn.Linear)]
    assert len(linear_o) == len(linear_p), (ours, seq)
    with torch.no_grad():
        for o, p in zip(linear_o, linear_p, strict=True):
            o.weight.copy_(p.weight)
            o.bias.copy_(p.bias)
        if bias_add is not None:
            linear_o[-1].bias.add_(bias_add)


def copy_pyro_weights(theirs: torch.nn.Module, ours: AIR, nvil: NVIL) -> None:
    """Every weight of Pyro's AIR (and its baseline) into ours: then both compute the same."""
    pixels = ours.cfg.canvas**2
    copy_lstm(ours.rnn, theirs.rnn, pixels)
    copy_lstm(nvil.baseline_rnn, theirs.bl_rnn, pixels)
    where_loc = torch.tensor(ours.cfg.where_prior_loc)  # Pyro adds it after the head
    copy_mlp(ours.predict, theirs.predict.mlp.seq,
             torch.cat([torch.zeros(1), where_loc, torch.zeros(3)]))  # fmt: skip
    copy_mlp(ours.encoder, theirs.encode.mlp.seq)
    copy_mlp(ours.decoder, theirs.decode.mlp.seq, theirs.decode.bias)  # added after the MLP
    copy_mlp(nvil.baseline_out, theirs.bl_predict.seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pyro-air", type=Path, required=True, help="Pyro's examples/air folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Default grid_sample")
    torch.set_num_threads(1)

    import pyro  # noqa: PLC0415
    import pyro.infer.tracegraph_elbo as tge  # noqa: PLC0415
    from pyro.infer import TraceGraph_ELBO  # noqa: PLC0415

    air_mod, main_mod = import_pyro_air(args.pyro_air)
    X = train_images(N_TRAIN)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    theirs = build_pyro_air(air_mod)
    prior = main_mod.make_prior(0.01)

    # Ours in Pyro's form: the sd of z_where relative to the prior's, Pyro's one-sample KL
    # surrogate, the baseline's output scaled by B/N.
    cfg = ModelConfig(where_scale_relative=True, sparse_images=False)
    ours = AIR(cfg)
    nvil = NVIL(ours, NVIL.Params(kl_estimate="sampled", baseline_scale=BATCH / N_TRAIN))
    copy_pyro_weights(theirs, ours, nvil)

    # One Pyro step's traces, capturing the downstream cost and baseline of each z_pres site.
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    original = tge._construct_baseline

    def spy(node, guide_site, downstream_cost):  # noqa: ANN001, ANN202
        out = original(node, guide_site, downstream_cost)
        captured[node] = (downstream_cost.detach().clone(), out[2].detach().clone())
        return out

    tge._construct_baseline = spy
    elbo = TraceGraph_ELBO()
    kwargs = {"z_pres_prior_p": prior}
    model_trace, guide_trace = elbo._get_trace(theirs.model, theirs.guide, (X, BATCH), kwargs)
    _, surrogate = tge._compute_elbo(model_trace, guide_trace)
    tge._construct_baseline = original
    theirs.zero_grad()
    surrogate.backward()
    x = _plain(model_trace.nodes["obs"]["value"]).view(-1, 50, 50)  # the batch Pyro drew
    scale = guide_trace.nodes["z_pres_0"]["scale"]

    # Replay Pyro's samples through ours: the same presence draws, windows and codes.
    T = cfg.max_steps
    z_pres = torch.stack([guide_trace.nodes[f"z_pres_{t}"]["value"].squeeze(-1) for t in range(T)])
    pres_u = torch.where(z_pres > 0, torch.zeros_like(z_pres), torch.ones_like(z_pres))
    where_noise, what_noise, pyro_where_sd, pyro_pres_p = [], [], [], []
    for t in range(T):
        fw = guide_trace.nodes[f"z_where_{t}"]["fn"].base_dist.base_dist
        fq = guide_trace.nodes[f"z_what_{t}"]["fn"].base_dist.base_dist
        fp = guide_trace.nodes[f"z_pres_{t}"]["fn"].base_dist
        zw = guide_trace.nodes[f"z_where_{t}"]["value"]
        zq = guide_trace.nodes[f"z_what_{t}"]["value"]
        where_noise.append((zw - fw.loc) / fw.scale)
        what_noise.append((zq - fq.loc) / fq.scale)
        pyro_where_sd.append(fw.scale)
        pyro_pres_p.append(fp.probs.squeeze(-1))
    noise = Noise(pres=_plain(pres_u), where=_plain(torch.stack(where_noise)),
                  what=_plain(torch.stack(what_noise)))  # fmt: skip
    ours.draw_noise = lambda *_: noise  # type: ignore[method-assign]  # Pyro's draws
    out = nvil.loss(ours, x, 0.01)
    ours.zero_grad()
    out.loss.backward()
    tr = out.trace

    ran = tr.ran
    rows = []

    def row(name: str, a: torch.Tensor, b: torch.Tensor, note: str = "") -> None:
        rows.append((name, float((a - b).abs().max()), float(b.abs().max()), note))

    obs = model_trace.nodes["obs"]["unscaled_log_prob"]
    row("log p(x|z) per image", tr.log_lik, obs)
    row("presence prob (steps that ran)", tr.pres_prob * ran, torch.stack(pyro_pres_p))
    row("z_where sample", tr.z_where, torch.stack([guide_trace.nodes[f"z_where_{t}"]["value"]
                                                   for t in range(T)]))  # fmt: skip
    row("z_what sample", tr.z_what, torch.stack([guide_trace.nodes[f"z_what_{t}"]["value"]
                                                 for t in range(T)]))  # fmt: skip
    # Every gradient: Pyro's surrogate is N/B x a sum over the batch (= N x our mean); its
    # baseline loss sums (N/B x cost - net)^2, ours averages (cost - net x B/N)^2: B (N/B)^2.
    grad_rows = []
    nb = float(scale)
    for name, mine, theirs_g, factor in _pairs(ours, nvil, theirs, nb):
        ref = theirs_g / factor
        rel = float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        grad_rows.append((name, rel, float(ref.abs().max())))
    # Pyro's presence-site downstream cost, divided by its plate scale N/B, against the per-image
    # downstream ELBO built from Pyro's own sampled terms (sites of steps >= t, plus the obs).
    per_site = {}
    for name in ("z_pres", "z_where", "z_what"):
        for t in range(T):
            m = model_trace.nodes[f"{name}_{t}"]["unscaled_log_prob"]
            g = guide_trace.nodes[f"{name}_{t}"]["unscaled_log_prob"]
            per_site[(name, t)] = m - g
    for t in range(T):
        later = sum(per_site[(n, s)] for n in ("z_pres", "z_where", "z_what") for s in range(t, T))
        mine = (obs + later) * ran[t]
        cost, base = captured[f"z_pres_{t}"]
        row(f"z_pres_{t} downstream cost / (N/B)", cost / scale * ran[t], mine,
            f"Pyro's target is N/B = {scale:.1f} x this")  # fmt: skip

    sd0 = pyro_where_sd[0]
    print(f"batch of {BATCH} of our training images; Pyro plate scale N/B = {scale:.2f}\n")
    print(f"{'quantity':42s} {'max |ours - Pyro|':>18s} {'max |Pyro|':>12s}  note")
    for name, diff, mag, note in rows:
        print(f"{name:42s} {diff:18.3g} {mag:12.4g}  {note}")
    head = f"{'gradient (ours vs Pyro / its scale)':42s} {'max rel. diff':>18s}"
    print(f"\n{head} {'max |grad|':>12s}")
    for name, rel, mag in grad_rows:
        print(f"{name:42s} {rel:18.3g} {mag:12.4g}")
    print("\nz_where posterior sd at initialisation, step 0 (mean over the batch):")
    print(f"  Pyro (softplus(out) * prior sd (0.2, 1, 1)): {sd0.mean(0).tolist()}")
    print(f"  ours (softplus(out), bias -> where_scale_init {cfg.where_scale_init}): "
          f"{_our_sd0(AIR(ModelConfig(sparse_images=False)), x).mean(0).tolist()}")  # fmt: skip
    cost0, base0 = captured["z_pres_0"]
    print("\nNVIL baseline regression target, step 0 (per image, nats):")
    print(f"  Pyro: downstream cost {cost0.mean():.4g} (sd {cost0.std():.3g}) = N/B x ELBO terms")
    print(f"  ours: downstream ELBO {_target0(tr).mean():.4g} (sd {_target0(tr).std():.3g})")
    print(
        "  an Adam step moves either net's output by about as much; relative to its target "
        f"that is N/B = {float(scale):.1f} x smaller in Pyro's"
    )


def _pairs(ours: AIR, nvil: NVIL, theirs: torch.nn.Module, nb: float):  # noqa: ANN202
    """(name, our gradient, Pyro's gradient, Pyro's / ours) for every weight of both models.

    Our ImageLSTM splits Pyro's LSTMCell: the image block of weight_ih (transposed), the rest of
    weight_ih with weight_hh (the recurrent weight), and one bias for bias_ih + bias_hh.
    """
    n = N_TRAIN
    lin = lambda seq: [m for m in seq if isinstance(m, torch.nn.Linear)]  # noqa: E731
    for tag, o_seq, p_seq, f in (("predict", ours.predict, theirs.predict.mlp.seq, n),
                                 ("encoder", ours.encoder, theirs.encode.mlp.seq, n),
                                 ("decoder", ours.decoder, theirs.decode.mlp.seq, n),
                                 ("baseline head", nvil.baseline_out, theirs.bl_predict.seq,
                                  nb * nb * BATCH)):  # fmt: skip
        for i, (o, p) in enumerate(zip(lin(o_seq), lin(p_seq), strict=True)):
            yield f"{tag} layer {i} weight", o.weight.grad, p.weight.grad, f
            yield f"{tag} layer {i} bias", o.bias.grad, p.bias.grad, f
    pixels = ours.cfg.canvas**2
    for tag, o, p, f in (
        ("LSTM", ours.rnn, theirs.rnn, n),
        ("baseline LSTM", nvil.baseline_rnn, theirs.bl_rnn, nb * nb * BATCH),
    ):
        yield f"{tag} image weight", o.image_weight.grad, p.weight_ih.grad[:, :pixels].t(), f
        yield f"{tag} bias", o.image_bias.grad, p.bias_ih.grad, f
        recurrent = torch.cat([p.weight_ih.grad[:, pixels:], p.weight_hh.grad], 1)
        yield f"{tag} recurrent weight", o.recurrent.weight.grad, recurrent, f


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A copy without autograd history or Pyro's provenance tracking."""
    from pyro.ops.provenance import detach_provenance  # noqa: PLC0415

    return detach_provenance(t).detach().clone()


def _our_sd0(model: AIR, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        flat = model.flat_images(x)
        gates = model.rnn.project(flat)
        first = torch.cat([x.new_zeros(x.shape[0], 3 + model.cfg.z_what_dim),
                           x.new_ones(x.shape[0], 1)], 1)  # fmt: skip
        h, _ = model.rnn.step(gates, first, None)
        return torch.nn.functional.softplus(model.predict(h)[:, 4:7])


def _target0(trace) -> torch.Tensor:  # noqa: ANN001
    from implementations.core.estimators import downstream_elbo  # noqa: PLC0415

    return downstream_elbo(trace)[0].detach()


if __name__ == "__main__":
    main()
