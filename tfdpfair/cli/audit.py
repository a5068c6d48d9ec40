r"""Privacy audit of the demo recipe: one-run canary audit, or membership inference by subgroup.

  tfdpfair-audit --mode=canaries --workdir=runs/audit
  tfdpfair-audit --mode=canaries --canary_kind=input --workdir=runs/audit_bb
  tfdpfair-audit --mode=membership --workdir=runs/audit_mia
  tfdpfair-audit --mode=membership --model_file=runs/demo/release/model.keras
  tfdpfair-audit --mode=membership --run_dir=runs/demo   # every */model.keras

--mode=canaries trains its own audited DP run (canaries are extra examples, so they need their
own run) on the config's private digits with a small MLP (--hidden units), the config's DP
settings (σ or target ε, δ, C, B, epochs) and SGD at the config's learning rate.
--mode=membership scores a model's training examples (the private split) against held-out ones
(the test split) by their loss: a model file, the release exports of a run directory, or, with
neither, a DP and a non-private MLP that it trains itself.

Writes into --workdir (default: --run_dir if given): audit.json, audit.md (a "Privacy audit"
section for the run's report) and a plot. Membership statistics are un-noised statistics of the
private training data: audit.json's "release" field, the section's heading and the plot's title
say "Not for release" (for the data custodian and people already allowed to see the data).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import keras
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import tfdpfair.models  # noqa: F401  registers NFNet/WRN layers for keras.models.load_model
from tfdpfair.audit import epsilon_lower_bound, fdp_lower_bound, losses, membership, report
from tfdpfair.cli import config_path
from tfdpfair.data.demo import DemoData, load_demo_data
from tfdpfair.fairness.plots import eps_text

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_path.default_config("demo"),
    "Experiment configuration file or packaged config name (data and DP settings are read "
    "from it).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: --run_dir).")
_MODE = flags.DEFINE_enum("mode", "canaries", ["canaries", "membership"], "What to audit.")
_KIND = flags.DEFINE_enum("canary_kind", "gradient", ["gradient", "input"],
                          "White-box gradient canaries or black-box mislabelled inputs.")
_NUM_CANARIES = flags.DEFINE_integer("num_canaries", 500, "m, the number of canaries.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden units of the audit's MLP.")
_MODEL_FILE = flags.DEFINE_string("model_file", None, "A .keras model to audit (membership).")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory whose */model.keras release "
                               "exports are audited (membership).")
_RESAMPLES = flags.DEFINE_integer("num_resamples", 200, "Bootstrap replicates for the CIs.")
_SEED = flags.DEFINE_integer("audit_seed", 0, "Seed of the canaries and the bootstrap.")


def log(message: str) -> None:
    print(f"[audit {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_config(config):
    """With --run_dir: the run's own config (its config.json), so the audit reads the data the
    run trained on; otherwise --config."""
    if not _RUN_DIR.value:
        return config
    saved = pathlib.Path(_RUN_DIR.value) / "config.json"
    if not saved.exists():
        raise app.UsageError(f"{saved} is missing: --run_dir must be a directory written by "
                             "tfdpfair-train (its config.json names the run's data).")
    import ml_collections
    return ml_collections.ConfigDict(json.loads(saved.read_text()))


def load_data(config) -> DemoData:
    name = setting(config, "data.name")
    if name != "digits":
        where = f"the run in {_RUN_DIR.value}" if _RUN_DIR.value else "this config"
        raise app.UsageError(
            f"{where} trained on data.name={name!r}; this binary audits digits runs only (it "
            "needs the run's members and held-out examples with their subgroups). For other "
            "data, score your model's per-example losses on training and held-out examples and "
            "call tfdpfair.audit.membership.membership_inference (docs/audit.md).")
    return load_demo_data(public_fraction=config.data.public_fraction,
                          test_fraction=config.data.test_fraction,
                          image_size=config.data.image_size, seed=config.seed)


def mlp(input_shape, num_classes: int, hidden: int, seed: int) -> keras.Model:
    """The audit's small model: flatten -> Dense(hidden, relu) -> Dense(classes) logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(num_classes, name="head")])


def setting(config, path: str, default=None):
    """config value at a dotted path, or ``default`` when absent (configs evolve)."""
    node = config
    for key in path.split("."):
        if node is None or key not in node:
            return default
        node = node[key]
    return default if node is None else node


def dp_config(config):
    """DPConfig from config.dp (only the fields the audit's run uses)."""
    from tfdpfair.privacy.dp_sgd import DPConfig
    fields = ("l2_norm_clip", "expected_batch_size", "micro_batch_size", "noise_multiplier",
              "target_epsilon", "delta", "accountant", "rescale_to_unit_norm", "noise_seed",
              "sampling_seed")
    return DPConfig(**{f: setting(config, f"dp.{f}") for f in fields
                       if setting(config, f"dp.{f}") is not None})


def run_length(config) -> dict:
    """epochs= or steps= of the DP run, from config.dp."""
    steps = setting(config, "dp.steps")
    return {"steps": int(steps)} if steps else {"epochs": float(setting(config, "dp.epochs", 1))}


def compiled_dp_model(config, data: DemoData, seed: int):
    from tfdpfair.training.dp_model import make_private
    model = mlp(data.private.images.shape[1:], len(data.class_names), _HIDDEN.value, seed)
    private = make_private(model, dp_config(config))
    lr = setting(config, "optimizer.learning_rate", 1.0)
    private.compile(optimizer=keras.optimizers.SGD(lr),  # the llr score needs plain SGD
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, private


def gradient_canary_audit(config, data: DemoData, workdir: pathlib.Path) -> tuple[dict, dict]:
    from tfdpfair.audit.whitebox import audit_gradient_canaries
    _, private = compiled_dp_model(config, data, _SEED.value)
    result = audit_gradient_canaries(
        private, data.private.images, data.private.labels, num_canaries=_NUM_CANARIES.value,
        seed=_SEED.value + 1, score="llr", **run_length(config))
    plot = report.plot_canary_scores(result.scores, result.included, result.audit.k,
                                     workdir / "canary_scores.png")
    return result.as_dict(), {"canary scores": plot}


def input_canary_audit(config, data: DemoData, workdir: pathlib.Path) -> tuple[dict, dict]:
    from tfdpfair.audit.input_canaries import InputCanaries
    from tfdpfair.audit.whitebox import default_ks
    m = min(_NUM_CANARIES.value, len(data.public))
    canaries = InputCanaries(data.public.images[:m], data.public.labels[:m],
                             len(data.class_names), seed=_SEED.value + 1)
    x, y = canaries.training_set(data.private.images, data.private.labels)
    model, private = compiled_dp_model(config, data, _SEED.value)
    plan = private.prepare(len(x), **run_length(config))
    private.fit(x, y, verbose=2)
    scores = canaries.scores(model)
    audit = epsilon_lower_bound.audit_from_scores(scores, canaries.included, default_ks(m),
                                                  plan.delta)
    audit_fdp = fdp_lower_bound.fdp_audit_from_scores(scores, canaries.included, default_ks(m),
                                                      plan.delta)
    result = {"mode": "input_canaries", "score": "-loss", **audit.as_dict(),
              "epsilon_lower_bound": audit.epsilon, **audit_fdp.report_fields(),
              "accountant_epsilon": plan.epsilon(),
              "noise_multiplier": plan.noise_multiplier, "sampling_rate": plan.sampling_rate,
              "steps": plan.steps, "num_included": int(canaries.included.sum())}
    del result["epsilon"]
    result["ks_tried"] = list(audit.ks_tried)
    plot = report.plot_canary_scores(scores, canaries.included, audit.k,
                                     workdir / "canary_scores.png")
    return result, {"canary scores": plot}


def membership_of(model: keras.Model, data: DemoData) -> dict:
    members = losses.per_example_losses(model, data.private.images, data.private.labels)
    held_out = losses.per_example_losses(model, data.test.images, data.test.labels)
    groups = {a: np.concatenate([data.private.groups[a], data.test.groups[a]])
              for a in data.private.groups}
    return membership.membership_inference(
        -np.concatenate([members, held_out]),
        np.r_[np.ones(len(members)), np.zeros(len(held_out))], groups,
        num_resamples=_RESAMPLES.value, seed=_SEED.value)


def models_to_audit(config, data: DemoData) -> dict[str, keras.Model]:
    """name -> model: --model_file, the run directory's release exports, or two fresh MLPs."""
    if _MODEL_FILE.value:
        return {pathlib.Path(_MODEL_FILE.value).stem: keras.models.load_model(_MODEL_FILE.value)}
    if _RUN_DIR.value:
        files = sorted(pathlib.Path(_RUN_DIR.value).glob("**/model.keras"))
        if not files:
            raise FileNotFoundError(
                f"no */model.keras release export under {_RUN_DIR.value}: membership inference "
                "needs the model (DPModel.export_release writes it), or pass --model_file.")
        return {str(f.parent.relative_to(_RUN_DIR.value)): keras.models.load_model(f)
                for f in files}
    model, private = compiled_dp_model(config, data, _SEED.value)
    log("training the DP MLP")
    private.fit(data.private.images, data.private.labels, verbose=2, **run_length(config))
    baseline = mlp(data.private.images.shape[1:], len(data.class_names), _HIDDEN.value,
                   _SEED.value)
    lr = setting(config, "non_private.optimizer.learning_rate",
                 setting(config, "non_private.learning_rate", 1e-3))
    baseline.compile(optimizer=keras.optimizers.Adam(lr),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    log("training the non-private MLP")
    batch = int(setting(config, "dp.expected_batch_size", 256))
    epochs = max(1, round(private.logical_steps_done * batch / len(data.private)))
    baseline.fit(data.private.images, data.private.labels, verbose=2, batch_size=batch,
                 epochs=epochs)  # about as many steps as the DP run
    return {f"dp (ε = {eps_text(private.epsilon_spent())})": model, "non-private": baseline}


def main(argv) -> None:
    del argv
    config = run_config(_CONFIG.value)
    workdir = pathlib.Path(_WORKDIR.value or _RUN_DIR.value or "runs/audit")
    workdir.mkdir(parents=True, exist_ok=True)
    data = load_data(config)
    if _MODE.value == "canaries":
        log(f"one-run audit with {_NUM_CANARIES.value} {_KIND.value} canaries")
        run = gradient_canary_audit if _KIND.value == "gradient" else input_canary_audit
        result, plots = run(config, data, workdir)
        audit = {"canaries": result}
        log(f"ε lower bounds (95% each): {result['epsilon_lower_bound']:.3f} (Steinke et al.), "
            f"{result['epsilon_lower_bound_fdp']:.3f} (f-DP, μ ≥ "
            f"{result['mu_lower_bound_fdp']:.3f}); accountant ε "
            f"{result['accountant_epsilon']:.3f}, σ = {result['noise_multiplier']:.4g}")
    else:
        results = {name: membership_of(model, data)
                   for name, model in models_to_audit(config, data).items()}
        audit = {"membership": results}
        attribute = next(iter(data.private.groups))
        plots = {"membership AUC by subgroup": report.plot_membership(
            results, attribute, workdir / "membership_auc.png")}
        for name, res in results.items():
            log(f"{name}: AUC {res['overall']['auc']['value']:.3f}, advantage "
                f"{res['overall']['advantage']['value']:.3f}")
    json_path, md_path, section = report.write_audit(workdir, audit, plots)
    log(f"wrote {json_path} and {md_path}")
    if "membership" in audit:
        log(f"{report.NOT_FOR_RELEASE}: {md_path.name}, {json_path.name} and the plot are for "
            f"{report.WHO_MAY_SEE}.")
    if (_RUN_DIR.value and workdir == pathlib.Path(_RUN_DIR.value)
            and report.add_to_run_report(workdir / "report.md", section)):
        log(f"added the privacy audit section to {workdir / 'report.md'}")


def run() -> None:
    """Console script ``tfdpfair-audit``."""
    app.run(main, argv=config_path.resolve_argv(sys.argv))


if __name__ == "__main__":
    run()
