r"""Privacy audit: one-run canary audit of the demo recipe, or membership inference by subgroup.

  tfdpfair-audit --mode=canaries --workdir=runs/audit
  tfdpfair-audit --mode=canaries --canary_kind=input --workdir=runs/audit_bb
  tfdpfair-audit --mode=canaries --config=demo --config.dp.target_epsilon=2 --workdir=runs/a2
  tfdpfair-audit --mode=membership --workdir=runs/audit_mia
  tfdpfair-audit --mode=membership --model_file=runs/demo/release/model.keras
  tfdpfair-audit --mode=membership --run_dir=runs/demo   # every */model.keras
  tfdpfair-audit --mode=membership --run_dir=runs/chexpert_f0_eps8 --held_out=validation

--mode=canaries trains its own audited DP run (canaries are extra examples, so they need their
own run) on the --config's private digits with a small MLP (--hidden units), the config's DP
settings (σ or target ε, δ, C, B, epochs) and SGD at the config's learning rate; `--config`
takes a config name or path as tfdpfair-train does, `--config.dp.target_epsilon=2` etc. change
it. Canary runs on other data (CheXpert, MIMIC-CXR, TFDS) are out of scope and refused.
--mode=membership scores a model's training examples (members) against held-out examples of the
same distribution (non-members) by the run's own loss (tfdpfair/audit/run_membership.py): with
--run_dir, the run's release exports on the run's own data, read from its config.json through
the trainer's readers (digits, CheXpert, MIMIC-CXR, TFDS; non-members: its test split, or
--held_out=validation); with --model_file, one model on --config's data; with neither, a DP and
a non-private MLP that it trains itself on the digits. Missing data, a run without a held-out
split or unsupported data are refused before any model is loaded.

Writes into --workdir (default: --run_dir if given): audit.json, audit.md (a "Privacy audit"
section for the run's report) and plots. Membership statistics are un-noised statistics of the
private training data: audit.json's "release" field, the section's heading and the plots' titles
say "Not for release" (for the data custodian and people already allowed to see the data).
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time

import keras
from absl import app, flags
from ml_collections import config_flags

import tfdpfair.models  # noqa: F401  registers NFNet/WRN layers for keras.models.load_model
from tfdpfair.audit import epsilon_lower_bound, fdp_lower_bound, report, run_membership
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
_CANARY_MODEL = flags.DEFINE_enum(
    "canary_model", "mlp", ["mlp", "config"], "Model of the binary's own audit run: its MLP "
    "(--hidden units), or --config's model (config.model: architecture, initial weights, the "
    "demo's public pre-training, trained layers), i.e. the recipe the config ships.")
_MODEL_FILE = flags.DEFINE_string("model_file", None, "A .keras model to audit (membership).")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory whose */model.keras release "
                               "exports are audited (membership).")
_HELD_OUT = flags.DEFINE_enum("held_out", "test", list(run_membership.HELD_OUT),
                              "Non-members (--mode=membership): the run's test or validation "
                              "split.")
_DATA_OVERRIDE = flags.DEFINE_multi_string(
    "data_override", [], "KEY=PATH, KEY in root, mimic_iv_dir, data_dir: where the run's data "
    "is now if it moved (--mode=membership; nothing else about the data can change).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Examples per forward pass when scoring.")
_RESAMPLES = flags.DEFINE_integer("num_resamples", 200, "Bootstrap replicates for the CIs.")
_SEED = flags.DEFINE_integer("audit_seed", 0, "Seed of the canaries and the bootstrap.")


def log(message: str) -> None:
    print(f"[audit {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_config(config):
    """With --run_dir: the run's own config (its config.json), so the audit reads the data the
    run trained on; otherwise --config."""
    if not _RUN_DIR.value:
        return config
    try:
        return run_membership.read_run_config(_RUN_DIR.value)
    except run_membership.AuditDataError as err:
        raise app.UsageError(str(err)) from None


def load_data(config) -> DemoData:
    """The digits of the binary's own audit runs (canaries; membership without a model)."""
    name = setting(config, "data.name")
    if name != "digits":
        where = f"the run in {_RUN_DIR.value}" if _RUN_DIR.value else "--config"
        raise app.UsageError(
            f"{where} trains on data.name={name!r}; the audits that train their own DP run "
            "(--mode=canaries, and --mode=membership without --run_dir or --model_file) run on "
            "the digits only (--config=demo). Canary runs on chest X-ray (CheXpert, MIMIC-CXR) "
            "or TFDS data are out of scope. To audit a trained run on its own data, use "
            "--mode=membership --run_dir=RUN.")
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


def output_dir() -> pathlib.Path:
    return pathlib.Path(_WORKDIR.value or _RUN_DIR.value or "runs/audit")


def audited_model(config, data: DemoData, seed: int) -> keras.Model:
    """The audit run's model (--canary_model): the MLP, or config.model built and initialised
    as tfdpfair-train does (the demo pre-trains on its public split, cached in the workdir)."""
    if _CANARY_MODEL.value == "mlp":
        return mlp(data.private.images.shape[1:], len(data.class_names), _HIDDEN.value, seed)
    from tfdpfair.trainer import registries, runner
    from tfdpfair.trainer.task_data import load_task_data
    keras.utils.set_random_seed(seed)
    task = load_task_data(config.data, config.seed)  # the digits, as the trainer reads them
    model = registries.build_model(config.model, task.input_shape, task.num_classes)
    if registries.load_initial_weights(model, config.model) == "public_pretraining":
        runner.pretrain_public(config, task, model, output_dir() / "pretrained.weights.h5")
    trained = registries.set_trainable(model, config.model.train)
    log(f"audit model: config.model {config.model.name} {config.model.get('variant', '')}, "
        f"trained: {config.model.train} ({trained:,} parameters)")
    return model


def compiled_dp_model(config, data: DemoData, seed: int):
    from tfdpfair.training.dp_model import make_private
    model = audited_model(config, data, seed)
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


def model_files() -> dict[str, pathlib.Path]:
    """name -> .keras file: --model_file, or every */model.keras release export of --run_dir."""
    if _MODEL_FILE.value:
        path = pathlib.Path(_MODEL_FILE.value)
        if not path.exists():
            raise app.UsageError(f"--model_file={path} does not exist.")
        return {path.stem: path}
    files = sorted(pathlib.Path(_RUN_DIR.value).glob("**/model.keras"))
    if not files:
        raise app.UsageError(
            f"no */model.keras release export under {_RUN_DIR.value}: membership inference "
            "needs the model (DPModel.export_release writes it), or pass --model_file.")
    return {str(f.parent.relative_to(_RUN_DIR.value)): f for f in files}


def fresh_models(config, data: DemoData) -> dict[str, keras.Model]:
    """A DP and a non-private MLP trained here on the digits (no --model_file, --run_dir)."""
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


def membership_data(config) -> run_membership.MembershipData:
    """The members and non-members (refusals become usage errors, before any model loads)."""
    try:
        config = run_membership.with_overrides(config, _DATA_OVERRIDE.value)
        data = run_membership.load_membership_data(config, _HELD_OUT.value)
        if _RUN_DIR.value:
            run_membership.check_matches_run(_RUN_DIR.value, data)
    except run_membership.AuditDataError as err:
        raise app.UsageError(str(err)) from None
    setup = data.setup()
    log(f"data {setup['data']}: members = {setup['members']}, non-members = "
        f"{setup['non_members']}, subgroups {list(data.groups) or 'none'}, "
        f"{setup['bootstrap']} bootstrap")
    return data


def load_model_file(path: pathlib.Path) -> keras.Model:
    log(f"scoring {path}")
    return keras.models.load_model(path)


def baseline_of_run(config, data: run_membership.MembershipData) -> keras.Model | None:
    model = run_membership.non_private_baseline(config, data, _RUN_DIR.value)
    if model is not None:
        log("scoring the run's non-private baseline (the comparison; not a release)")
    return model


def membership_audit(config, workdir: pathlib.Path) -> tuple[dict, dict]:
    """Membership inference of every audited model, by subgroup; (audit, plots)."""
    own_run = not (_MODEL_FILE.value or _RUN_DIR.value)
    digits = load_data(config) if own_run else None  # refuses non-digits first
    files = {} if own_run else model_files()
    data = membership_data(config)
    if own_run:
        loaders = {name: functools.partial(lambda m: m, model)
                   for name, model in fresh_models(config, digits).items()}
    else:
        loaders = {name: functools.partial(load_model_file, path)
                   for name, path in files.items()}
        if _RUN_DIR.value and not _MODEL_FILE.value:
            loaders["non_private"] = functools.partial(baseline_of_run, config, data)
    results = {}
    for name, load in loaders.items():
        model = load()
        if model is None:
            continue  # the run trained no non-private baseline
        results[name] = run_membership.membership_of(
            model, data, batch_size=_BATCH.value, num_resamples=_RESAMPLES.value,
            seed=_SEED.value)
        log(f"{name}: AUC {results[name]['overall']['auc']['value']:.3f}, advantage "
            f"{results[name]['overall']['advantage']['value']:.3f}")
    attributes = list(data.groups) or ["overall"]
    plots = {f"membership AUC by {a}": report.plot_membership(
        results, a, workdir / ("membership_auc.png" if i == 0 else f"membership_auc_{a}.png"))
        for i, a in enumerate(attributes)}
    return {"membership": results}, plots


def main(argv) -> None:
    del argv
    config = run_config(_CONFIG.value)
    workdir = output_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    if _MODE.value == "canaries":
        data = load_data(config)
        log(f"one-run audit with {_NUM_CANARIES.value} {_KIND.value} canaries")
        run = gradient_canary_audit if _KIND.value == "gradient" else input_canary_audit
        result, plots = run(config, data, workdir)
        audit = {"canaries": result}
        log(f"ε lower bounds (95% each): {result['epsilon_lower_bound']:.3f} (Steinke et al.), "
            f"{result['epsilon_lower_bound_fdp_eps_delta']:.3f} (f-DP, (ε, δ) curve; these two "
            f"hold for any mechanism), {result['epsilon_lower_bound_fdp']:.3f} (f-DP, Gaussian "
            f"curve, μ ≥ {result['mu_lower_bound_fdp']:.3f}); accountant ε "
            f"{result['accountant_epsilon']:.3f}, σ = {result['noise_multiplier']:.4g}")
    else:
        audit, plots = membership_audit(config, workdir)
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
