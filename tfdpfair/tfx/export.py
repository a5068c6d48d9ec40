"""Serving export: a SavedModel for TF Serving / TFX, its privacy statement and its model card.

Directory layout written by :func:`export_serving` (atomically: staged in a temporary sibling
directory, then renamed into place):

  saved_model.pb, variables/, fingerprint.pb   the SavedModel
      signature "serving_default": examples (string [B], serialized tf.Example) ->
          probabilities float32 [B, K]; the image feature is parsed, decoded, resized, converted
          to the model's channels and normalised inside the graph (tfx/examples.py).
      signature "serving_images": images (float32 [B, h, w, c] with values in [0, 1], any h, w;
          c = the example format's image channels) -> probabilities [B, K], same preprocessing.
  privacy_statement.json   ε, δ, σ, T, q, accountant, unit of privacy, N, C (no seeds)
  model_card.md            data, model, privacy, evaluation, fairness summary

Only the inference model is exported: it is round-tripped through a ``.keras`` file and reloaded
uncompiled, so no optimizer, DP state, secret seed or other training-only object is reachable
from the SavedModel, whatever the caller's model object carried.

The statement stays bound to the weights DP-SGD produced (training/release_binding.py): a
DPModel whose weights changed outside DP-SGD since its last release is refused, and so is an
audit run with canaries; a plain keras model is exported only with a privacy record that carries
the fingerprint of exactly its weights (``privacy_record_from_release`` of the release export it
was loaded from).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import keras
import tensorflow as tf

from tfdpfair.data.sources import ImageConfig
from tfdpfair.privacy.statement import privacy_statement
from tfdpfair.tfx import examples as examples_lib
from tfdpfair.tfx.config import ExampleFormat
from tfdpfair.tfx.model_card import ModelCardInfo, render_model_card
from tfdpfair.training import release_binding
from tfdpfair.training.release import check_releasable

PRIVACY_STATEMENT = "privacy_statement.json"
MODEL_CARD = "model_card.md"
OUTPUTS = ("softmax", "sigmoid", "none")
_RECORD_KEYS = ("epsilon", "delta", "noise_multiplier", "steps", "sampling_rate",
                "expected_batch_size", "accountant", "unit_of_privacy", "num_examples")


def privacy_record_of(dp_model, weights: str = "last") -> dict[str, Any]:
    """The publishable privacy record of a trained DPModel (no seeds, no training statistics).

    Keys: epsilon, delta, noise_multiplier (σ), steps (T taken), planned_steps, sampling_rate
    (q), expected_batch_size, accountant, unit_of_privacy ("example" or "patient"), num_examples
    (N units), l2_norm_clip (C), target_epsilon, weights, adjacency, statement (plain language).
    """
    check_releasable(dp_model, "the serving export")
    plan = dp_model.plan
    steps = dp_model.logical_steps_done
    with dp_model.swapped_weights(weights):
        fingerprint = release_binding.combined_digest(dp_model.inner.weights)
    return {"weights_fingerprint": f"{fingerprint:016x}", "epsilon": plan.epsilon(steps), "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier, "steps": steps,
            "planned_steps": plan.steps, "sampling_rate": plan.sampling_rate,
            "expected_batch_size": plan.expected_batch_size, "accountant": plan.accountant,
            "unit_of_privacy": plan.unit, "num_examples": plan.num_examples,
            "l2_norm_clip": dp_model.dp_config.l2_norm_clip,
            "target_epsilon": plan.target_epsilon, "weights": weights,
            "adjacency": "add-or-remove-one", "statement": privacy_statement(plan, steps)}


def privacy_record_from_release(release_dir: str | os.PathLike) -> dict[str, Any]:
    """The privacy record of a release export (DPModel.export_release's privacy.json)."""
    release = json.loads((pathlib.Path(release_dir) / "privacy.json").read_text())
    plan, steps = release["plan"], release["logical_steps"]
    statement = pathlib.Path(release_dir) / "PRIVACY.md"
    if "audit_run" in release:
        raise release_binding.ReleaseBindingError(
            f"{release_dir} is a marked audit run ({release['audit_run']['canaries']} gradient "
            "canaries): not a model to serve.")
    return {"weights_fingerprint": release.get("weights_fingerprint"),
            "epsilon": release["epsilon"], "delta": release["delta"],
            "noise_multiplier": plan["noise_multiplier"], "steps": steps,
            "planned_steps": plan["steps"],
            "sampling_rate": plan["expected_batch_size"] / plan["num_examples"],
            "expected_batch_size": plan["expected_batch_size"],
            "accountant": release["accountant"], "unit_of_privacy": plan.get("unit", "example"),
            "num_examples": plan["num_examples"], "l2_norm_clip": release.get("l2_norm_clip"),
            "target_epsilon": plan.get("target_epsilon"), "weights": release.get("weights"),
            "adjacency": "add-or-remove-one",
            "statement": statement.read_text().strip() if statement.exists() else None}


def _inference_copy(model, weights: str, staging: pathlib.Path) -> keras.Model:
    """A fresh, uncompiled copy of the inference model (``.keras`` round trip)."""
    path = staging / "inference_copy.keras"
    if hasattr(model, "inner") and hasattr(model, "swapped_weights"):  # a DPModel
        with model.swapped_weights(weights):
            model.inner.save(path)
    else:
        if weights != "last":
            raise ValueError("weights= selects a DPModel's averages; pass the DPModel, or a "
                             "keras model that already holds the weights to serve.")
        model.save(path)
    copy = keras.saving.load_model(path, compile=False)
    path.unlink()
    return copy


def _check_fingerprint(serving_model: keras.Model, record: Mapping[str, Any]) -> None:
    """The record must describe exactly these weights (its ``weights_fingerprint``)."""
    expected = record.get("weights_fingerprint")
    got = f"{release_binding.combined_digest(serving_model.weights):016x}"
    if expected != got:
        raise release_binding.ReleaseBindingError(
            "the serving export refused: the privacy record "
            + ("carries no weights_fingerprint" if expected is None else
               "was written for other weights")
            + " so it cannot be shown to describe the weights being exported (weights trained "
            "or edited outside DP-SGD carry no statement). Export the DPModel itself, or the "
            "model.keras of a release export with privacy_record_from_release(that directory).")


def _activation(output: str):
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    return {"softmax": tf.nn.softmax, "sigmoid": tf.nn.sigmoid, "none": tf.identity}[output]


def _write_saved_model(model: keras.Model, fmt: ExampleFormat, output: str,
                       path: pathlib.Path) -> dict[str, str]:
    """Writes the SavedModel with both signatures; returns signature -> description."""
    activation = _activation(output)

    def serve_examples(examples):
        images = examples_lib.images_from_serialized(examples, fmt)
        return {"probabilities": activation(tf.cast(model(images, training=False), tf.float32))}

    def serve_images(images):
        inputs = examples_lib.images_from_pixels(images, fmt)
        return {"probabilities": activation(tf.cast(model(inputs, training=False), tf.float32))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_examples,
                         input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    archive.add_endpoint("serving_images", serve_images, input_signature=[
        tf.TensorSpec([None, None, None, fmt.input_channels], tf.float32, name="images")])
    archive.write_out(str(path), verbose=False)
    height, width = fmt.image_config.image_size
    return {"serving_default": f"examples: serialized tf.Example strings [B] (image in feature "
                               f"'{fmt.image_key}', {fmt.encoding}) -> probabilities [B, K] "
                               f"({output}); resized to {height}x{width}, "
                               f"{fmt.image_config.normalization} normalisation in the graph",
            "serving_images": f"images: float32 [B, h, w, {fmt.input_channels}] in [0, 1] -> "
                              "probabilities [B, K], same preprocessing"}


def _replace_directory(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Moves ``staging`` to ``directory``; an existing one is only removed once the new is in."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
        os.replace(directory, old)
    try:
        os.replace(staging, directory)
    except BaseException:
        if old is not None:
            os.replace(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_serving(model, directory: str | os.PathLike,
                   image_config: ImageConfig | ExampleFormat,
                   privacy_record: Mapping[str, Any] | None = None, *, weights: str = "last",
                   output: str = "softmax", card: ModelCardInfo | None = None
                   ) -> pathlib.Path:
    """Writes a servable SavedModel plus privacy_statement.json and model_card.md.

    Args:
      model: a trained DPModel (its ``inner`` model is exported, with the ``weights``
        average), or a plain keras.Model holding the weights to serve (e.g.
        ``keras.saving.load_model("release/model.keras")`` from DPModel.export_release).
      directory: the export directory (TFX: ``fn_args.serving_model_dir``); replaced
        atomically if it exists.
      image_config: the model's input preprocessing (tfdpfair.data.sources.ImageConfig, the
        one training used), or a full ExampleFormat (feature keys, PNG/JPEG vs float list). With
        an ImageConfig, examples carry an encoded PNG/JPEG in feature "image", decoded to
        ``image_config.channels`` channels.
      privacy_record: ε, δ, σ, T, q, accountant, unit_of_privacy, N (see
        :func:`privacy_record_of`; :func:`privacy_record_from_release` reads a release export).
        Required for a plain keras.Model; derived from a DPModel when None.
      weights: "last", "ema" or "polyak" (DPModel only).
      output: "softmax" (multiclass logits), "sigmoid" (multilabel logits) or "none" (the
        model already outputs probabilities).
      card: what the model card says beyond the model and privacy (data, evaluation,
        fairness summary); a minimal card is written when None.

    Returns:
      The export directory. Nothing in it holds seeds, optimizer state or DP state.
    """
    is_dp = hasattr(model, "inner") and hasattr(model, "swapped_weights")
    if privacy_record is None:
        if not is_dp:
            raise ValueError("a serving export must carry its privacy statement: pass "
                             "privacy_record= (e.g. privacy_record_from_release(release_dir)) "
                             "with a plain keras model, or pass the DPModel.")
        privacy_record = privacy_record_of(model, weights)
    elif is_dp:
        check_releasable(model, "the serving export")
    missing = [k for k in _RECORD_KEYS if k not in privacy_record]
    if missing:
        raise ValueError(f"privacy_record lacks {missing}.")
    fmt = image_config if isinstance(image_config, ExampleFormat) else ExampleFormat(
        decode_channels=image_config.channels, image_config=image_config)
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        scratch = pathlib.Path(tempfile.mkdtemp(prefix="copy.", dir=staging))
        serving_model = _inference_copy(model, weights, scratch)
        shutil.rmtree(scratch)
        _check_fingerprint(serving_model, privacy_record)
        signatures = _write_saved_model(serving_model, fmt, output, staging)
        record = {k: v for k, v in dict(privacy_record).items() if "seed" not in k}
        (staging / PRIVACY_STATEMENT).write_text(json.dumps(record, indent=2) + "\n")
        card = card or ModelCardInfo(model={"architecture": serving_model.name,
                                            "parameters": serving_model.count_params()})
        (staging / MODEL_CARD).write_text(render_model_card(card, record, signatures))
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
