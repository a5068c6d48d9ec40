"""PyTorch / Opacus side of benchmarks/peers_wrn.py; prints one JSON line.

Runs under the separate peers virtualenv (``make bench-peers`` creates .venv-peers with CPU
torch, opacus==1.6.* and numpy); it imports nothing from tfdpfair, so it needs no TensorFlow.

The model is the torch twin of tfdpfair.models.wide_resnet.build_wide_resnet("WRN-16-4"): a
pre-activation WRN-16-4 (act → GroupNorm(16) → conv) whose every convolution is weight-
standardised with a learnable per-filter gain and a bias (``WSConv2d``, the same formula as
tfdpfair.models.layers.standardize_kernel), GroupNorm eps 1e-3 (Keras' default), a final
act → GroupNorm → mean pool → Linear head initialised to zero. Parameter counts match the
Keras model's (checked by the orchestrator). The only difference: 3×3 stride-2 convs pad
(1, 1) here and TF "SAME" pads (0, 1); the output shapes and FLOPs are the same.

Cases, each timed after warm-up on a fixed random batch of B examples 32×32×3, 10 classes:
  * non_dp: forward + mean-loss backward + SGD step on all B examples at once;
  * opacus_hooks: Opacus 1.6 ``grad_sample_mode="hooks"`` (materialised per-sample gradients);
  * opacus_ghost: ``grad_sample_mode="ghost"`` (Opacus' ghost clipping, two backward passes).
DP cases run one logical step of B examples as B/m physical batches of m (``--micro-batch``;
the Opacus optimizer accumulates the clipped sums of skipped steps, as BatchMemoryManager
does), then noise and the update: the same unit as tfdpfair's DPModel.fit with q = 1.

WSConv2d is a plain nn.Module (not an nn.Conv2d subclass), on purpose: Opacus' Conv2d grad
sampler would otherwise compute the per-sample gradient of the *standardised* kernel and clip
that, a different mechanism from clipping the gradient of the raw trained kernel (which
tfdpfair does). Opacus therefore computes its per-sample gradients with functorch
(torch.func.vmap) in both modes; which path each layer takes is reported in the JSON.

Reference modes (not the same architecture; opt-in with ``--modes``): ``non_dp_plainconv`` and
``hooks_plainconv`` use plain ``nn.Conv2d`` (with bias, no standardisation, no gain) instead of
WSConv2d, so Opacus' native Conv2d grad sampler (unfold + einsum) runs: Opacus' best case on
this network shape.

  .venv-peers/bin/python benchmarks/peers_torch_worker.py --batch 128 --micro-batch 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


class WSConv2d(nn.Module):
    """Conv with scaled weight standardisation, learnable gain (init 1) and bias (init 0)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, eps: float = 1e-4):
        super().__init__()
        self.stride, self.padding, self.eps = stride, k // 2, eps
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        std = (1.0 / (cin * k * k)) ** 0.5 / 0.87962566  # Keras VarianceScaling(1, fan_in)
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        self.gain = nn.Parameter(torch.ones(cout))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * self.gain.view(-1, 1, 1, 1)
        return F.conv2d(x, w * scale - mean * scale, self.bias, self.stride, self.padding)


def plain_conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(16, channels, eps=1e-3)


class Block(nn.Module):
    """y = conv1(norm1(relu(conv0(norm0(relu(x)))))) + skip (see wide_resnet.py)."""

    def __init__(self, cin: int, cout: int, stride: int, project: bool, conv=WSConv2d):
        super().__init__()
        self.norm0, self.conv0 = group_norm(cin), conv(cin, cout, 3, stride)
        self.norm1, self.conv1 = group_norm(cout), conv(cout, cout, 3)
        self.project = project
        if project:
            self.skip_norm, self.skip_conv = group_norm(cin), conv(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(x)
        skip = self.skip_conv(self.skip_norm(a)) if self.project else x
        out = self.conv0(self.norm0(a))
        out = self.conv1(self.norm1(F.relu(out)))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int = 16, width: int = 4, num_classes: int = NUM_CLASSES,
                 conv=WSConv2d):
        super().__init__()
        n = (depth - 4) // 6
        layers: list[nn.Module] = [conv(3, 16, 3)]
        cin = 16
        for channels, stride in zip((16, 32, 64), (1, 2, 2)):
            for b in range(n):
                layers.append(Block(cin, channels * width, stride if b == 0 else 1, b == 0,
                                    conv))
                cin = channels * width
        self.body = nn.Sequential(*layers)
        self.final_norm = group_norm(cin)
        self.head = nn.Linear(cin, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_norm(F.relu(self.body(x)))
        return self.head(x.mean(dim=(2, 3)))


def time_steps(step, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_non_dp(x, y, args, conv=WSConv2d) -> list[float]:
    torch.manual_seed(0)
    model = WideResNet(conv=conv).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return time_steps(step, args.warmup, args.repeats)


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def layer_paths(model: nn.Module, mode: str) -> dict[str, list[str]]:
    """Which Opacus path each parameterised module type takes (from Opacus' own tables)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping as FGC)

    paths: dict[str, set[str]] = {}
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        kind = type(module)
        if mode == "ghost" and kind in FGC.NORM_SAMPLERS:
            path = "ghost norm"
        elif kind in GradSampleModule.GRAD_SAMPLERS:
            path = "per-sample grads (hooks)"
        else:
            path = "per-sample grads (functorch vmap)"
        paths.setdefault(path, set()).add(kind.__name__)
    return {k: sorted(v) for k, v in paths.items()}


def run_opacus(x, y, args, mode: str, conv=WSConv2d) -> tuple[list[float], dict]:
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = WideResNet(conv=conv).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # N = B examples and one loader batch of B: sample rate 1, expected batch B (as q = 1 in
    # tfdpfair). The loader only sets these; the fixed tensors are fed directly.
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch)
    engine = PrivacyEngine(accountant="rdp")
    capture = _LogCapture()
    logging.getLogger().addHandler(capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
            **({"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}))
    logging.getLogger().removeHandler(capture)
    if mode == "ghost":
        dp_model, dp_opt, criterion, _ = made
    else:
        (dp_model, dp_opt, _), criterion = made, nn.CrossEntropyLoss()
    m = args.micro_batch
    chunks = [(x[i:i + m], y[i:i + m]) for i in range(0, args.batch, m)]

    def step():
        for i, (xb, yb) in enumerate(chunks):
            dp_opt.signal_skip_step(do_skip=i < len(chunks) - 1)  # as BatchMemoryManager
            loss = criterion(dp_model(xb), yb)
            loss.backward()  # ghost: the wrapped loss runs both backward passes
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

    times = time_steps(step, args.warmup, args.repeats)
    info = {"layer_paths": layer_paths(model, mode),
            "warnings": sorted({str(w.message)[:200] for w in caught})[:5],
            "logged": sorted(set(capture.lines))[:5]}
    return times, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32, help="logical batch B")
    parser.add_argument("--micro-batch", type=int, default=32, help="physical batch m (DP)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="non_dp,hooks,ghost",
                        help="of non_dp, hooks, ghost, non_dp_plainconv, hooks_plainconv, "
                             "ghost_plainconv")
    args = parser.parse_args()
    if args.batch % args.micro_batch:
        parser.error("--batch must be a multiple of --micro-batch.")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, 3, 32, 32), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, NUM_CLASSES, args.batch))

    out: dict = {
        "worker": "torch", "batch": args.batch, "micro_batch": args.micro_batch,
        "params": sum(p.numel() for p in WideResNet().parameters()),
        "params_plainconv": sum(p.numel() for p in WideResNet(conv=plain_conv).parameters()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "warmup": args.warmup, "repeats": args.repeats}
    import opacus
    out["opacus"] = opacus.__version__
    for mode in args.modes.split(","):
        base = mode.removesuffix("_plainconv")
        conv = plain_conv if mode.endswith("_plainconv") else WSConv2d
        key = {"non_dp": "non_dp", "hooks": "opacus_hooks", "ghost": "opacus_ghost"}[base]
        key += "_plainconv" if conv is plain_conv else ""
        try:
            if base == "non_dp":
                times, info = run_non_dp(x, y, args, conv), {}
            else:
                times, info = run_opacus(x, y, args, base, conv)
        except Exception as e:  # report, do not hide: the orchestrator prints it
            out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        step_s = statistics.median(times)
        out[key] = {"step_s": round(step_s, 4), "examples_per_s": round(args.batch / step_s, 2),
                    **info}
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["cpu_count"], out["machine"] = os.cpu_count(), platform.machine()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
