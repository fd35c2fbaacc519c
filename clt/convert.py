"""Convert a trained TopK / BatchTopK CLT into a JumpReLU one (what circuit-tracer and Anthropic's
method want: a per-feature threshold, no dependence on the other features of the token).

    python -m clt.convert RUN --to jumprelu                      # L0 per layer = the TopK's
    python -m clt.convert RUN --to jumprelu --target-l0 8 --finetune-steps 200 --out runs/j

Calibration, on held-out activations (the run's held-out documents after the windows its evaluation
uses, which stay for the before/after numbers; every other one of those windows, the rest check the
L0 on tokens the calibration did not see):

    m_{l,f} = the smallest pre-activation h at which the TopK kept feature f of layer l   (its floor)
    θ_{l,f} = s_l · m_{l,f},   s_l by bisection so that E_n Σ_f 1[h_{n,l,f} > θ_{l,f}] = target_l

so each feature keeps the boundary TopK drew for it, scaled per layer to the L0 target (default:
the source's own held-out L0 per layer, k for TopK). Cross-fitted: m from the first half of the
calibration tokens, s_l from the second (a minimum is optimistic on the tokens it was taken from
and would bias the L0 low on new ones); a feature never kept in the first half takes its floor from
the second, one never kept at all gets θ above every pre-activation it had. Pre-activations,
encoder and decoder are the source's: on a token whose kept features all sit above their θ and the
rest below, the JumpReLU gives exactly the TopK's output.

`--finetune-steps N` then trains the JumpReLU CLT for N steps on the run's training text
(reconstruction + clt.sparsity_coeff · tanh sparsity + pre-activation loss, the run's learning
rate), and recalibrates the per-layer scales s_l so that the L0 target still holds. Writes OUT (a
run-like directory every tool reads: config.json with activation jumprelu, clt/, report.json with
FVU, L0 and spliced CE before and after).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import CLTError, command
from .model import CrossLayerTranscoder


class ConvertError(CLTError, ValueError):
    """A run that cannot be converted (not a run, not TopK / BatchTopK, too few held-out tokens)."""


# ---------------------------------------------------------------------------------------------
# The calibration (module docstring)


@torch.no_grad()
def kept_floors(src: CrossLayerTranscoder, h: torch.Tensor) -> torch.Tensor:
    """h: [N, L, F] pre-activations -> m: [L, F], the smallest h at which the source's training-form
    selection (TopK, cross-layer or BatchTopK over this batch) kept each feature; inf if never."""
    was = src.training
    src.train()
    a = src.activate(h)
    src.batchtopk_min_kept = None
    src.train(was)
    kept = a > 0
    return torch.where(kept, h, torch.full_like(h, float("inf"))).amin(0)


@torch.no_grad()
def layer_l0(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """h: [N, L, F], θ: [L, F] -> [L] mean active features per token of the JumpReLU."""
    return (h > theta).sum(-1).float().mean(0)


@torch.no_grad()
def scale_thresholds(
    h: torch.Tensor, floors: torch.Tensor, target: torch.Tensor, iters: int = 60
) -> torch.Tensor:
    """θ = s_l · m (m = floors, finite where the feature was kept) with s_l per layer by bisection
    (in log s) such that the L0 of layer l on h is target_l; never-kept features: above every h."""
    L, F = floors.shape
    kept = torch.isfinite(floors)
    top = h.amax(0)  # [L, F]
    never = top.clamp_min(0) * 2 + 1  # above every pre-activation seen
    m = torch.where(kept, floors, torch.ones_like(floors))
    theta = torch.empty_like(floors)
    for layer in range(L):
        lo, hi = torch.tensor(-12.0), torch.tensor(12.0)  # log s: L0 falls as s grows
        hl = h[:, layer]
        for _ in range(iters):
            mid = (lo + hi) / 2
            t = torch.where(kept[layer], mid.exp() * m[layer], never[layer])
            if (hl > t).sum(-1).float().mean() > target[layer]:
                lo = mid
            else:
                hi = mid
        s = ((lo + hi) / 2).exp()
        theta[layer] = torch.where(kept[layer], s * m[layer], never[layer])
    return theta


def to_jumprelu(src: CrossLayerTranscoder, theta: torch.Tensor) -> CrossLayerTranscoder:
    """The source's encoder, decoder and normalisation with JumpReLU thresholds θ: [L, F]."""
    extra = {**src.arch.extra, "converted_from": src.arch.activation}
    arch = replace(src.arch, activation="jumprelu", log_threshold=False, topk_scope="layer", extra=extra)
    out = CrossLayerTranscoder(arch, decode=src.decode_path)
    state = {k: v for k, v in src.state_dict().items() if k != "batchtopk_threshold"}
    out.load_state_dict(state, strict=False)
    with torch.no_grad():
        out.threshold_param.copy_(theta.to(out.threshold_param))
    return out.to(src.W_enc.device)


def calibrate(src: CrossLayerTranscoder, x: torch.Tensor, target: torch.Tensor) -> CrossLayerTranscoder:
    """x: [N, L, d] held-out CLT inputs -> the JumpReLU CLT with L0 `target` [L] on new tokens.

    Cross-fitted: the floors come from the first half of x (a feature never kept there takes its
    floor from the second half) and the per-layer scales from the second half. A floor is the
    minimum over the tokens it was found on, so scales fitted on those same tokens would sit too
    low for new ones (fewer of a feature's activations reach the floor elsewhere)."""
    with torch.no_grad():
        h = src.encode(x.to(src.W_enc.device).float())
        n = len(h) // 2
        first, second = kept_floors(src, h[:n]), kept_floors(src, h[n:])
        floors = torch.where(torch.isfinite(first), first, second)
        theta = scale_thresholds(h[n:], floors, target.to(h.device))
        never = ~torch.isfinite(floors)  # above every pre-activation of either half
        theta = torch.where(never, h.amax(0).clamp_min(0) * 2 + 1, theta)
    return to_jumprelu(src, theta)


@torch.no_grad()
def recalibrate(clt: CrossLayerTranscoder, x: torch.Tensor, target: torch.Tensor) -> None:
    """Rescale a JumpReLU CLT's thresholds per layer (their ratios kept) to L0 `target` on x."""
    h = clt.encode(x.to(clt.W_enc.device).float())
    theta = clt.threshold.clone()
    clt.threshold_param.copy_(scale_thresholds(h, theta.clamp_min(1e-12), target.to(h.device)))


# ---------------------------------------------------------------------------------------------
# The command


def _load_run(run: Path, device: str):
    from .config import TrainConfig, load_config
    from .io import load_clt

    if not (run / "config.json").exists() or not (run / "clt").is_dir():
        raise ConvertError(f"{run} is not a finished training run (expected config.json and clt/)")
    cfg = load_config(json.loads((run / "config.json").read_text()), TrainConfig)
    return cfg, load_clt(run, device)


def evaluate(clt: CrossLayerTranscoder, subject, x, y, windows) -> dict:
    """Held-out FVU and L0 per layer, spliced CE (`clt.report.final_report`'s numbers)."""
    from .metrics import reconstruction_stats, spliced_eval

    clt.eval()
    dev = clt.W_enc.device
    s = reconstruction_stats(clt, x.to(dev), y.to(dev))
    return {
        "fvu_per_layer": s["fvu"].tolist(),
        "l0_per_layer": s["l0"].tolist(),
        "fvu": s["fvu"].mean().item(),
        **spliced_eval(subject, clt, windows),
    }


def finetune(clt: CrossLayerTranscoder, cfg, source, steps: int, progress: bool = True) -> list[float]:
    """N steps of the JumpReLU loss on the run's training text (module docstring); the losses."""
    from . import loss as losses

    c = replace(cfg.clt, activation="jumprelu")
    clt.train()
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    dead = torch.zeros(clt.n_layers, clt.d_sae, dtype=torch.bool, device=clt.W_enc.device)
    batches = source.batches()
    out = []
    for _ in tqdm(range(steps), desc="fine-tune", unit="step", disable=not progress):
        x, y, _ = next(batches)
        dev = clt.W_enc.device
        t = losses.clt_loss(clt, x.to(dev), y.to(dev), c, c.sparsity_coeff, dead)
        opt.zero_grad(set_to_none=True)
        t.total.backward()
        opt.step()
        out.append(float(t.total))
    clt.eval()
    return out


@torch.no_grad()
def l0_check(
    clt: CrossLayerTranscoder, x_cal: torch.Tensor, x_check: torch.Tensor, target: torch.Tensor
) -> dict:
    """L0 per layer on the calibration tokens and on the held-out check tokens, and the check's
    largest relative deviation from the target."""
    dev = clt.W_enc.device
    cal = layer_l0(clt.encode(x_cal.float().to(dev)), clt.threshold)
    chk = layer_l0(clt.encode(x_check.float().to(dev)), clt.threshold)
    t = target.to(dev)
    return {
        "calibration_l0_per_layer": cal.tolist(),
        "check_l0_per_layer": chk.tolist(),
        "check_l0_max_rel_error": float(((chk - t).abs() / t.clamp_min(1e-12)).max()),
    }


def convert(
    run: Path,
    out: Path,
    target_l0: float | None = None,
    finetune_steps: int = 0,
    calibration_windows: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    from .files import atomic_directory, write_atomic
    from .subject import load_subject
    from .training.run import make_source

    cfg, src = _load_run(run, device)
    if src.arch.activation not in ("topk", "batchtopk"):
        raise ConvertError(f"{run} is a {src.arch.activation} CLT: only TopK and BatchTopK convert")
    if target_l0 is not None and not 0 < target_l0 <= src.d_sae:
        raise ConvertError(f"--target-l0 must be in (0, {src.d_sae}], got {target_l0}")
    if finetune_steps < 0 or calibration_windows < 1:
        raise ConvertError("--finetune-steps must be ≥ 0 and --calibration-windows ≥ 1")
    n_eval = cfg.data.eval_windows
    cfg.data.eval_windows = n_eval + 2 * calibration_windows
    subject = load_subject(cfg.model, torch.device(device))
    source = make_source(cfg, subject)
    try:
        windows = source.eval_windows()
        if len(windows) < n_eval + 2 * max(1, calibration_windows // 2):
            raise ConvertError(
                f"{run}: its held-out documents (data.eval_docs={cfg.data.eval_docs}) give {len(windows)} "
                f"windows, {n_eval} for evaluation and too few left to calibrate and check on; lower "
                "--calibration-windows"
            )
        x_eval, y_eval = source.activations(windows[:n_eval])
        # the windows after the evaluation's, alternately: calibrate on one half, check L0 on the other
        x_cal, _ = source.activations(windows[n_eval::2])
        x_check, _ = source.activations(windows[n_eval + 1 :: 2])
        before = evaluate(src, subject, x_eval, y_eval, windows[:n_eval])
        if target_l0 is None:  # the source's own held-out L0 per layer (k for TopK)
            src.eval()
            target = torch.tensor(before["l0_per_layer"])
        else:
            target = torch.full((src.n_layers,), float(target_l0))
        clt = calibrate(src, x_cal, target)
        report: dict = {
            "source": str(run),
            "target_l0_per_layer": target.tolist(),
            "calibration_tokens": int(x_cal.shape[0]),
            "check_tokens": int(x_check.shape[0]),
            **l0_check(clt, x_cal, x_check, target),
            "before": before,
            "after_calibration": evaluate(clt, subject, x_eval, y_eval, windows[:n_eval]),
        }
        if finetune_steps:
            report["finetune_losses"] = finetune(clt, cfg, source, finetune_steps, progress)
            recalibrate(clt, x_cal, target)
            report |= l0_check(clt, x_cal, x_check, target)
            report["after_finetune"] = evaluate(clt, subject, x_eval, y_eval, windows[:n_eval])
    finally:
        source.close()
    cfg.data.eval_windows = n_eval
    cfg.clt = replace(cfg.clt, activation="jumprelu", topk_scope="layer")
    cfg.run_dir = str(out)
    with atomic_directory(out) as tmp:
        clt.cpu().save_pretrained(tmp / "clt")
        write_atomic(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
        write_atomic(tmp / "report.json", json.dumps(report, indent=2))
    return report


def format_report(r: dict) -> str:
    cols = [("before", "TopK")] + [
        (k, k.replace("_", " ")) for k in ("after_calibration", "after_finetune") if k in r
    ]
    head = "| | " + " | ".join(name for _, name in cols) + " |"
    rows = [head, "|---" * (len(cols) + 1) + "|"]
    n = len(r["before"]["fvu_per_layer"])
    for layer in range(n):
        cells = [
            f"{r[k]['fvu_per_layer'][layer]:.3f} (L0 {r[k]['l0_per_layer'][layer]:.1f})" for k, _ in cols
        ]
        rows.append(f"| layer {layer} FVU | " + " | ".join(cells) + " |")
    for key, name in (
        ("fvu", "mean FVU"),
        ("eval/ce_loss_spliced", "spliced CE"),
        ("eval/ce_loss_score", "CE-loss score"),
    ):
        rows.append(f"| {name} | " + " | ".join(f"{r[k][key]:.3f}" for k, _ in cols) + " |")
    rows.append(
        f"L0 per layer on {r['check_tokens']} held-out check tokens (not calibrated on): at most "
        f"{100 * r['check_l0_max_rel_error']:.1f}% off the target"
    )
    return "\n".join(rows)


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m clt.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("run", type=Path, help="a finished TopK or BatchTopK training run directory")
    ap.add_argument("--to", choices=["jumprelu"], required=True, help="the activation to convert to")
    ap.add_argument(
        "--target-l0", type=float, help="active features per token in every layer (default: the source's)"
    )
    ap.add_argument("--finetune-steps", type=int, default=0, help="JumpReLU training steps after calibrating")
    ap.add_argument(
        "--calibration-windows",
        type=int,
        default=64,
        help="held-out windows to calibrate on (as many more check the L0)",
    )
    ap.add_argument("--out", type=Path, help="output directory (default: RUN-jumprelu)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or args.run.with_name(args.run.name + "-jumprelu")
    report = convert(
        args.run, out, args.target_l0, args.finetune_steps, args.calibration_windows, args.device
    )
    print(format_report(report))
    print(f"wrote {out}/ (clt/, config.json, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
