"""One-run white-box audits of the demo recipe: ε lower bounds against the accountant's ε.

Designs (docs/audit.md, "Dirac canaries"):
  random_llr    the existing canaries (audit/canaries.py): m random directions of norm C over
                the MLP's parameters, all-steps llr score (SGD, steps_per_execution=1);
  dirac_last    Dirac canaries (audit/dirac.py) in CanarySlots coordinates, scored from θ_0 and
                θ_T only (an auditor who sees the final model);
  dirac_all     the same canaries scored by the llr of every released update (an auditor who
                sees every release; steps_per_execution=1 for the recorder).

For each design and each ε in --epsilons: σ calibrated to ε (PLD accountant, δ = 1e-5), one
audited run, the Steinke–Nasr–Jagielski bound and the two f-DP bounds (Gaussian curve: μ_LB and
its ε; (ε, δ) curve: valid for every mechanism) from the same guesses. Then a
broken-mechanism control per design: noise σ/10 while the run claims the ε of σ (--claim); the
llr assumes the claimed σ. It must be flagged (a bound above the claimed ε).

Demo digits (N = 1168 private examples), MLP 64-512-10, C = 1, SGD(0.5), unit-norm rescaling.
The canaries count in N (N + m units). Prints one JSON line per case.

  python benchmarks/audit_table.py [--epsilons 1 4 8] [--designs ...] [--num_dirac 40000]
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import time

import keras
import numpy as np

from tfdpfair.audit import dirac
from tfdpfair.audit.whitebox import audit_gradient_canaries
from tfdpfair.data.demo import load_demo_data
from tfdpfair.models.canary_slots import with_canary_slots
from tfdpfair.privacy import accounting
from tfdpfair.privacy.dp_sgd import DPConfig
from tfdpfair.training.dp_model import make_private

DESIGNS = ("random_llr", "dirac_last", "dirac_all")
THREAT = {"random_llr": "white-box, every release (per-step updates)",
          "dirac_last": "white-box, final model only (θ_0 and θ_T)",
          "dirac_all": "white-box, every release (per-step updates)"}
DELTA = 1e-5
ACCOUNTANT = "pld"
CLIP = 1.0
LEARNING_RATE = 0.5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def demo_xy() -> tuple[np.ndarray, np.ndarray]:
    data = load_demo_data(public_fraction=0.15, test_fraction=0.2)
    return data.private.images.reshape(len(data.private), -1), data.private.labels


def mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(512, activation="relu"),
                             keras.layers.Dense(10)])


def recipe(design: str, n: int, args) -> dict:
    """Expected batch B, micro-batch, length and m of a design's run (m counts in N)."""
    if design == "random_llr":  # the recipe of tests/test_audit_canaries.py
        return dict(m=args.num_random, batch=64, micro=64, epochs=args.random_epochs, steps=None)
    m = args.num_dirac
    return dict(m=m, batch=max(1, round(args.dirac_rate * (n + m))), micro=256, epochs=None,
                steps=args.dirac_steps)


def honest_plan(design: str, n: int, epsilon: float, args) -> accounting.PrivacyPlan:
    r = recipe(design, n, args)
    return accounting.plan_dp_sgd(num_examples=n + r["m"], expected_batch_size=r["batch"],
                                  steps=r["steps"], epochs=r["epochs"], target_epsilon=epsilon,
                                  delta=DELTA, accountant=ACCOUNTANT)


def audit_run(design: str, x, y, args, *, target_epsilon=None, noise_multiplier=None,
              score_noise_multiplier=None, seed: int = 3, accountant: str = ACCOUNTANT) -> dict:
    """One audited run of ``design``: both bounds, the run's plan values, m."""
    r = recipe(design, len(x), args)
    config = DPConfig(l2_norm_clip=CLIP, expected_batch_size=r["batch"],
                      micro_batch_size=r["micro"], noise_multiplier=noise_multiplier,
                      target_epsilon=target_epsilon, delta=DELTA, accountant=accountant,
                      rescale_to_unit_norm=True, noise_seed=seed, sampling_seed=seed + 1)
    model = mlp()
    if design != "random_llr":
        model, _ = with_canary_slots(model, r["m"])
    dp = make_private(model, config)
    per_call = 1 if design != "dirac_last" else 10
    dp.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               steps_per_execution=per_call)
    if design == "random_llr":
        res = audit_gradient_canaries(dp, x, y, num_canaries=r["m"], seed=seed,
                                      epochs=r["epochs"], score="llr",
                                      score_noise_multiplier=score_noise_multiplier)
    else:
        res = dirac.audit_dirac_canaries(
            dp, x, y, seed=seed, steps=r["steps"],
            score="last_iterate" if design == "dirac_last" else "all_steps",
            score_noise_multiplier=score_noise_multiplier)
    steinke, fdp = res.audit, res.audit_fdp
    return {"m": r["m"], "expected_batch": r["batch"], "steps": res.steps,
            "sampling_rate": round(res.sampling_rate, 5),
            "noise_multiplier": round(res.noise_multiplier, 5),
            "run_accountant_epsilon": res.accountant_epsilon,
            "steinke_lb": round(steinke.epsilon, 4), "steinke_k": steinke.k,
            "steinke_v_of_r": [steinke.v, steinke.r], "fdp_lb": round(fdp.epsilon, 4),
            "fdp_mu_lb": round(fdp.mu, 4), "fdp_k": fdp.k,
            "fdp_eps_delta_lb": round(fdp.epsilon_eps_delta, 4),
            "fdp_eps_delta_k": fdp.k_eps_delta, "ks_tried": list(steinke.ks_tried),
            "steps_per_execution": per_call, "clipping": dp.clipping_method}


def run_case(design: str, epsilon: float, x, y, args, broken: bool = False) -> dict:
    """The JSON record of one case: a DP run at ``epsilon``, or the broken control that runs
    σ/10 while claiming ``epsilon``. ``claimed_epsilon`` is what the bounds are compared to."""
    start = time.perf_counter()
    if broken:
        honest = honest_plan(design, len(x), epsilon, args)
        claimed = honest.epsilon(honest.steps)
        # The broken run's own ε (huge) is accounted with RDP: PLD at σ/10 needs many GB.
        out = audit_run(design, x, y, args, noise_multiplier=honest.noise_multiplier / 10,
                        score_noise_multiplier=honest.noise_multiplier, accountant="rdp")
    else:
        out = audit_run(design, x, y, args, target_epsilon=epsilon)
        claimed = out["run_accountant_epsilon"]
    record = {
        "benchmark": "audit_table", "design": design, "threat_model": THREAT[design],
        "case": "broken_sigma_over_10" if broken else "dp", "target_epsilon": epsilon,
        "claimed_epsilon": round(claimed, 4), "accountant": ACCOUNTANT, "delta": DELTA,
        **out,
        "ratio_steinke": round(out["steinke_lb"] / claimed, 3),
        "ratio_fdp": round(out["fdp_lb"] / claimed, 3),
        "ratio_fdp_eps_delta": round(out["fdp_eps_delta_lb"] / claimed, 3),
        "flagged_steinke": out["steinke_lb"] > claimed, "flagged_fdp": out["fdp_lb"] > claimed,
        "flagged_fdp_eps_delta": out["fdp_eps_delta_lb"] > claimed,
        "wall_s": round(time.perf_counter() - start, 1), "cpu_model": cpu_model(),
        "threads": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    record["run_accountant_epsilon"] = round(record["run_accountant_epsilon"], 4)
    return record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--claim", type=float, default=4.0,
                        help="ε claimed by the broken (σ/10) control runs")
    parser.add_argument("--no_broken", action="store_true")
    parser.add_argument("--num_dirac", type=int, default=40_000)
    parser.add_argument("--dirac_steps", type=int, default=50)
    parser.add_argument("--dirac_rate", type=float, default=0.5,
                        help="Poisson rate q of the Dirac runs (B = q·(N + m))")
    parser.add_argument("--num_random", type=int, default=500)
    parser.add_argument("--random_epochs", type=float, default=5.0)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    x, y = demo_xy()
    for design in args.designs:
        for epsilon in args.epsilons:
            print(json.dumps(run_case(design, epsilon, x, y, args)), flush=True)
        if not args.no_broken:
            print(json.dumps(run_case(design, args.claim, x, y, args, broken=True)), flush=True)


if __name__ == "__main__":
    main()
