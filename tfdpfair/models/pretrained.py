"""Load DeepMind's published NFNet ImageNet checkpoints (``F{n}_haiku.npz``) into our models.

The checkpoints released with the NFNet paper hold a Haiku parameter tree
{module path: {parameter name: array}}. Module paths join names with "/~/" under the root
module "NFNet"; Haiku names unnamed modules after their class in snake case, numbering
repeats "_1", "_2", …:

  NFNet/~/stem_conv{0..3}                      w (HWIO), gain, bias
  NFNet/~/nf_block, NFNet/~/nf_block_{i}       skip_gain           (i = global block index)
  NFNet/~/nf_block_{i}/~/conv0|conv1|conv1b|conv2|conv_shortcut      w, gain, bias
  NFNet/~/nf_block_{i}/~/squeeze_excite/~/linear | linear_1          w ([in, out]), b
  NFNet/~/final_conv                           w, gain, bias
  NFNet/~/linear                               w ([features, 1000]), b   (the classifier)

Conv kernels are already HWIO and Dense kernels [in, out], as in Keras, so weights are copied
without transposition. Accepted inputs: an ``.npz`` whose keys are "<module path>/<param>"
(e.g. "NFNet/~/nf_block_3/~/conv0/w") or dotted ("NFNet.nf_block_3.conv0.w", the flat form
of the authors' ``flatten_haiku_tree``); a nested mapping already in memory; or, with
``allow_pickle=True`` and for trusted files only, the original pickled tree (the published
files are dill pickles of Haiku objects; unpickling runs code from the file, needs dill, from
the optional extra ``pip install 'tfdpfair[checkpoints]'``, and needs the packages the pickle
references, e.g. dm-haiku and jax, to be importable).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Literal, Mapping

import keras
import numpy as np

from tfdpfair.models import nfnet as nfnet_lib

_TOP_LEVEL = ("stem_conv", "nf_block", "final_conv", "linear")
_CONV_PARAMS = {"w": "kernel", "gain": "gain", "bias": "bias"}
_BLOCK_CONVS = ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut")
HEAD_PREFIX = "linear/"

CHECKPOINTS_EXTRA = "pip install 'tfdpfair[checkpoints]'"
"""Installs dill, needed to unpickle the published checkpoints (``allow_pickle=True``)."""

_CONVERT_STEPS = (
    "Convert it once, where dm-haiku, jax and dill are installed, with:\n"
    "  params = dill.load(open('F0_haiku.npz', 'rb'))\n"
    "  np.savez('F0_flat.npz', **{f'{m}/{p}': np.asarray(v) for m in params "
    "for p, v in params[m].items()})"
)
_CONVERT_HINT = (
    _CONVERT_STEPS + f"\nor pass allow_pickle=True for a file you trust (needs dill: "
    f"{CHECKPOINTS_EXTRA})."
)


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not fit the model (details in the message)."""


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_haiku_checkpoint` did; keys are normalised Haiku names."""

    loaded: list[str]
    skipped_head: list[str]
    head_reset: bool


def normalize_key(key: str) -> str:
    """"NFNet/~/nf_block_1/~/conv0/w" or "NFNet.nf_block_1.conv0.w" → "nf_block_1/conv0/w"."""
    parts = key.replace("/~/", "/").split("/") if "/" in key else key.split(".")
    if parts and not parts[0].startswith(_TOP_LEVEL):
        parts = parts[1:]  # the root module name ("NFNet", or a user-chosen one)
    return "/".join(parts)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested mapping {module: {param: array}} (or deeper) → {"module/param": array}."""
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, key))
        else:
            flat[key] = np.asarray(value)
    return flat


def _load_pickle(path: str) -> Mapping[str, Any]:
    """Unpickles a (trusted) Haiku tree with dill, which wrote the published files.

    dill comes with the optional extra: ``pip install 'tfdpfair[checkpoints]'``.
    """
    try:
        import dill  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise CheckpointError(
            f"'{path}' is not a plain .npz archive, so it is read as a pickle (the published "
            "F{n}_haiku.npz files are dill pickles), which needs dill: it is not installed. "
            f"Install the optional extra: {CHECKPOINTS_EXTRA}. Alternatively, make a plain "
            ".npz elsewhere. " + _CONVERT_STEPS) from e
    try:
        with open(path, "rb") as f:
            return dill.load(f)
    except (ModuleNotFoundError, AttributeError) as e:
        raise CheckpointError(
            f"Unpickling '{path}' needs a package that is not importable here ({e}). "
            + _CONVERT_HINT) from e


def read_haiku_params(
    source: str | os.PathLike | Mapping[str, Any], allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    """Reads a Haiku NFNet parameter tree into {normalised key: array}.

    Args:
      source: path to an .npz (flat keys) or to a pickled tree, or an in-memory mapping
        (nested {module: {param: array}} or flat).
      allow_pickle: permit unpickling (executes code from the file: trusted files only).

    Returns:
      {"nf_block_1/conv0/w": array, ...} with keys as produced by :func:`normalize_key`.
    """
    if isinstance(source, Mapping):
        flat = _flatten(source)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise CheckpointError(f"Checkpoint file '{path}' does not exist.")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise CheckpointError(f"'{path}' is a single .npy array, not a tree.")
                flat = {k: data[k] for k in data.files}
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            if not allow_pickle:
                raise CheckpointError(
                    f"'{path}' is not a plain .npz archive; it is probably the original "
                    "pickled Haiku tree, which is not read by default because unpickling "
                    "runs code from the file. " + _CONVERT_HINT) from e
            flat = _flatten(_load_pickle(path))
    return {normalize_key(k): np.asarray(v) for k, v in flat.items()}


def _conv_entries(module: str, layer: keras.layers.Layer) -> dict[str, Any]:
    """{"<module>/w": kernel var, "<module>/gain": …, "<module>/bias": …} for a WSConv2D."""
    return {f"{module}/{p}": getattr(layer, attr) for p, attr in _CONV_PARAMS.items()}


def _dense_entries(module: str, layer: keras.layers.Layer) -> dict[str, Any]:
    """{"<module>/w": kernel, "<module>/b": bias} for a Dense layer."""
    return {f"{module}/w": layer.kernel, f"{module}/b": layer.bias}


def haiku_variable_map(model: keras.Model) -> dict[str, Any]:
    """Normalised Haiku key → the Keras variable it loads into, for a model from build_nfnet."""
    mapping: dict[str, Any] = {}
    for i in range(4):
        mapping.update(_conv_entries(f"stem_conv{i}", model.get_layer(f"stem_conv{i}")))
    for block in nfnet_lib.nfnet_blocks(model):
        module = "nf_block" if block.index == 0 else f"nf_block_{block.index}"
        mapping[f"{module}/skip_gain"] = block.skip_gain
        for conv in _BLOCK_CONVS:
            if hasattr(block, conv):
                mapping.update(_conv_entries(f"{module}/{conv}", getattr(block, conv)))
        mapping.update(_dense_entries(f"{module}/squeeze_excite/linear", block.se.fc0))
        mapping.update(_dense_entries(f"{module}/squeeze_excite/linear_1", block.se.fc1))
    mapping.update(_conv_entries("final_conv", model.get_layer("final_conv")))
    mapping.update(_dense_entries("linear", model.get_layer("head")))
    return mapping


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    if not items:
        return ""
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def _check_fit(
    params: Mapping[str, np.ndarray], targets: Mapping[str, Any], ignored: Iterable[str],
    adapt_input_channels: bool,
) -> None:
    """Raises CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    ignored = set(ignored)
    missing = sorted(k for k in targets if k not in params and k not in ignored)
    unexpected = sorted(k for k in params if k not in targets and k not in ignored)
    mismatched = []
    for key in sorted(set(targets) & set(params) - ignored):
        want, got = tuple(targets[key].shape), tuple(params[key].shape)
        if want != got and not (adapt_input_channels and _adaptable(key, got, want)):
            mismatched.append(f"{key}: checkpoint {got} vs model {want}")
    if missing or unexpected or mismatched:
        ckpt_blocks = len({k.split("/")[0] for k in params if k.startswith("nf_block")})
        model_blocks = len({k.split("/")[0] for k in targets if k.startswith("nf_block")})
        raise CheckpointError(
            "Checkpoint does not fit the model (checkpoint has "
            f"{ckpt_blocks} NF blocks, model has {model_blocks}; wrong variant?):"
            + _listing("missing from checkpoint", missing)
            + _listing("unexpected in checkpoint", unexpected)
            + _listing("shape mismatch", mismatched)
            + "\nFor a different number of classes pass head='reset'; for a 1-channel input "
            "pass adapt_input_channels=True.")


def _adaptable(key: str, got: tuple, want: tuple) -> bool:
    """The stem's first kernel with C_in = 3 can be summed into a C_in = 1 model kernel."""
    return key == "stem_conv0/w" and got[:2] == want[:2] and got[3] == want[3] and want[2] == 1


def grayscale_stem(
    kernel: np.ndarray, gain: np.ndarray, eps: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """A 1-channel WS stem equivalent to the RGB one on grey images x → (x, x, x).

    The RGB conv applies the standardised kernel ŵ (see layers.standardize_kernel), so a grey
    image sees t = Σ_c ŵ[:, :, c, :]. t has zero mean per filter (ŵ has zero mean over its
    whole fan-in), hence standardising t with gain sqrt(max(Σ t², eps)) returns t itself:
    we store kernel = t and that gain.
    """
    flat = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    mean, var = flat.mean(axis=0), flat.var(axis=0)
    standardized = (kernel - mean) * (gain / np.sqrt(np.maximum(var * flat.shape[0], eps)))
    summed = standardized.sum(axis=2, keepdims=True)
    new_gain = np.sqrt(np.maximum(np.sum(summed ** 2, axis=(0, 1, 2)), eps))
    return summed.astype(np.float32), new_gain.astype(np.float32)


def load_haiku_checkpoint(
    model: keras.Model,
    source: str | os.PathLike | Mapping[str, Any],
    head: Literal["load", "reset"] = "load",
    adapt_input_channels: bool = False,
    allow_pickle: bool = False,
) -> LoadReport:
    """Copies a Haiku NFNet checkpoint into ``model`` (built by ``build_nfnet``), in place.

    Every model variable must be found with the right shape and every checkpoint entry must
    be used, otherwise :class:`CheckpointError` lists all the problems and nothing is written.

    Args:
      model: an NFNet of the same variant as the checkpoint.
      source: see :func:`read_haiku_params`.
      head: "load" copies the classifier (shapes must match); "reset" leaves the model's own
        head (zero-initialised by ``build_nfnet``) and ignores the checkpoint's.
      adapt_input_channels: for a 1-channel model, convert the 3-channel stem with
        :func:`grayscale_stem`, so a grey image x gives the output the RGB model gives on
        (x, x, x).
      allow_pickle: see :func:`read_haiku_params`.

    Returns:
      A :class:`LoadReport`.
    """
    if head not in ("load", "reset"):
        raise ValueError(f"head must be 'load' or 'reset', got '{head}'.")
    params = read_haiku_params(source, allow_pickle=allow_pickle)
    targets = haiku_variable_map(model)
    head_keys = sorted(k for k in set(params) | set(targets) if k.startswith(HEAD_PREFIX))
    ignored = head_keys if head == "reset" else []
    _check_fit(params, targets, ignored, adapt_input_channels)
    params = dict(params)
    if adapt_input_channels and _adaptable(
            "stem_conv0/w", params["stem_conv0/w"].shape, tuple(targets["stem_conv0/w"].shape)):
        params["stem_conv0/w"], params["stem_conv0/gain"] = grayscale_stem(
            params["stem_conv0/w"], params["stem_conv0/gain"])
    loaded = []
    for key in sorted(set(targets) - set(ignored)):
        targets[key].assign(np.asarray(params[key], np.float32))
        loaded.append(key)
    logging.info("Loaded %d NFNet tensors (head %s).", len(loaded), head)
    return LoadReport(loaded=loaded, skipped_head=list(ignored), head_reset=head == "reset")


def load_pretrained_nfnet(
    variant: str,
    source: str | os.PathLike | Mapping[str, Any],
    num_classes: int = 1000,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    allow_pickle: bool = False,
    **build_kwargs: Any,
) -> keras.Model:
    """Builds ``build_nfnet(variant, num_classes, …)`` and loads a published checkpoint.

    The classifier is loaded when ``num_classes`` equals the checkpoint's number of classes
    and is otherwise a fresh zero-initialised head (the usual fine-tuning setup). A 1-channel
    ``input_shape`` loads the stem with ``adapt_input_channels=True``.
    """
    params = read_haiku_params(source, allow_pickle=allow_pickle)
    model = nfnet_lib.build_nfnet(
        variant, num_classes=num_classes, input_shape=input_shape, **build_kwargs)
    ckpt_classes = params.get(HEAD_PREFIX + "b", np.zeros([0])).shape[0]
    head = "load" if ckpt_classes == num_classes else "reset"
    load_haiku_checkpoint(
        model, params_as_tree(params), head=head, adapt_input_channels=input_shape[-1] == 1)
    return model


def params_as_tree(params: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"a/b/param": x} → {"NFNet/~/a/~/b": {"param": x}}: the Haiku layout, e.g. for np.savez."""
    tree: dict[str, dict[str, np.ndarray]] = {}
    for key, value in params.items():
        module, _, name = key.rpartition("/")
        tree.setdefault("NFNet/~/" + module.replace("/", "/~/"), {})[name] = value
    return tree
