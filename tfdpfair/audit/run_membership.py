"""Membership inference on a finished run: its members and non-members, read as it read them.

``tfdpfair-audit --mode=membership --run_dir=RUN`` audits the run's released models against
exactly the examples the run trained on (members) and held-out examples of the same
distribution (non-members), with the run's subgroups. Both come from the run's own config.json
through the trainer's task-data code (tfdpfair/trainer/task_data.py), so the same files,
label policy, image size, patient-level split and bad-file handling apply:

  data        members (training split)            non-members (``held_out``)
  digits      the private split                   "test" (the test split)
  chexpert    patient-level 80% of train.csv      "test" or "validation" (patient-level 10%)
  mimic_cxr   the official train split            "test" or "validation" (official validate)
  TFDS        data.train_split                    "test" (data.eval_split) or "validation"
                                                  (data.validation_split, if set)

The score of an example is −loss, where loss is the run's own training loss
(trainer.registries.make_loss): softmax cross-entropy for multiclass data, and for the
multi-label chest X-ray tasks the binary cross-entropy with logits averaged over the L = 14
labels (every label counts: the CXR readers map blank labels to 0, so no label is masked).
Members and non-members are both scored against un-smoothed targets (CheXpert's training-only
label smoothing, data.train_label_smoothing, is turned off for the audit), so the only
difference between the two sets is membership.

CIs: patient bootstrap when the examples carry patient ids (CheXpert, MIMIC-CXR: membership is
decided per patient by their patient-level splits, so one patient's images are all members or
all non-members and must be resampled together; this includes every patient-level DP run),
example bootstrap otherwise.

Refusals (:class:`AuditDataError`, raised before any model is loaded), each naming what is
missing and what to do: a data.name the trainer does not know; data not found where the config
says (``overrides`` can point path keys at a moved copy); no held-out split (none configured,
empty, or the training split itself); data that does not match the run (its N differs from the
run's metrics.json).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from tfdpfair.audit import losses, membership
from tfdpfair.trainer import task_data
from tfdpfair.trainer.task_data import EvalSplit

HELD_OUT = ("test", "validation")
PATH_KEYS = ("root", "mimic_iv_dir", "data_dir")  # where the data is, never which data


class AuditDataError(ValueError):
    """The run's members and non-members cannot be read as the run read them."""


@dataclasses.dataclass
class MembershipData:
    """The run's members and non-members (EvalSplits), its task and the audit's setup."""

    data_name: str
    task: str
    members: EvalSplit
    non_members: EvalSplit
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0

    @property
    def is_member(self) -> np.ndarray:
        return np.r_[np.ones(len(self.members)), np.zeros(len(self.non_members))]

    @property
    def groups(self) -> dict[str, np.ndarray]:
        """Subgroup label of every example (members first), for the attributes both have."""
        names = [a for a in self.members.groups if a in self.non_members.groups]
        return {a: np.concatenate([np.asarray(self.members.groups[a]).astype(str),
                                   np.asarray(self.non_members.groups[a]).astype(str)])
                for a in names}

    @property
    def patient_ids(self) -> np.ndarray | None:
        """Patient of every example (members first), or None without patient ids."""
        ids = [s.patient_ids for s in (self.members, self.non_members)]
        if any(i is None for i in ids):
            return None
        joined = np.concatenate([np.asarray(i).astype(str) for i in ids])
        return joined if (joined != "").all() else None

    def setup(self) -> dict[str, Any]:
        """What was compared, for audit.json and the report."""
        patients = self.patient_ids
        return {"data": self.data_name, "task": self.task,
                "members": f"{self.members.name} split ({len(self.members)} examples)",
                "non_members": f"{self.non_members.name} split ({len(self.non_members)} "
                               "examples)",
                "held_out_split": self.non_members.name,
                "loss": LOSS_TEXT[self.task],
                "bootstrap": ("example" if patients is None else
                              f"patient ({np.unique(patients).size} patients)")}


LOSS_TEXT = {"multiclass": "the run's softmax cross-entropy",
             "multilabel": "the run's binary cross-entropy with logits, mean over the labels, "
                           "un-smoothed targets"}


def read_run_config(run_dir: str | pathlib.Path) -> Any:
    """The run's config.json as a ConfigDict."""
    import ml_collections
    saved = pathlib.Path(run_dir) / "config.json"
    if not saved.exists():
        raise AuditDataError(f"{saved} is missing: --run_dir must be a directory written by "
                             "tfdpfair-train (its config.json names the run's data).")
    return ml_collections.ConfigDict(json.loads(saved.read_text()))


def with_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """A copy of ``config`` with ``KEY=PATH`` overrides of config.data's path keys.

    Only PATH_KEYS may change: anything else (image size, label policy, seed, splits) would
    change which examples are members and make the audit wrong.
    """
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or key not in PATH_KEYS:
            raise AuditDataError(
                f"--data_override={item!r}: expected KEY=PATH with KEY one of {PATH_KEYS} "
                "(where the data is; the run's other data settings decide which examples are "
                "members and cannot be overridden).")
        config.data[key] = value
    return config


def check_supported(data_config: Any) -> None:
    """Raises AuditDataError for a data.name the trainer's task-data code does not read."""
    name = data_config.get("name", None)
    if name in task_data.DATASETS or name in task_data.TFDS_NAMES:
        return
    raise AuditDataError(
        f"data.name={name!r} is not supported: the membership audit reads the run's data "
        f"through the trainer's readers ({sorted(task_data.DATASETS)} and TFDS "
        f"{list(task_data.TFDS_NAMES)}). For other data, score the model's per-example losses "
        "on training and held-out examples yourself and call "
        "tfdpfair.audit.membership.membership_inference (docs/audit.md).")


def _where(data_config: Any) -> str:
    keys = [k for k in PATH_KEYS if data_config.get(k, None)]
    return ", ".join(f"data.{k}={data_config[k]!r}" for k in keys) or "the default location"


def load_membership_data(config: Any, held_out: str = "test") -> MembershipData:
    """Members and non-members of the run configured by ``config`` (see module docstring)."""
    if held_out not in HELD_OUT:
        raise AuditDataError(f"held_out must be one of {HELD_OUT}, got {held_out!r}.")
    data_config = config.data
    check_supported(data_config)
    name = data_config.name
    if name == "chexpert":
        data_config = copy.deepcopy(data_config)
        data_config.train_label_smoothing = None  # members scored like non-members
    if name in task_data.TFDS_NAMES and data_config.get("eval_split") == \
            data_config.get("train_split"):
        raise AuditDataError(
            f"the run evaluates on its training split ({data_config.train_split!r}): it has no "
            "held-out split of the same distribution, so membership cannot be measured. Audit "
            "a run whose data.eval_split is a split it did not train on.")
    try:
        data = task_data.load_task_data(data_config, config.seed)
    except FileNotFoundError as err:
        raise AuditDataError(
            f"the run's data ({name}) is not where its config.json says ({_where(data_config)})"
            f": {err} Point the audit at the same data with --data_override=KEY=PATH (KEY one "
            f"of {PATH_KEYS}), or run the audit where the data is mounted.") from None
    except Exception as err:  # a reader's own message (paths only, never private values)
        raise AuditDataError(
            f"the run's data ({name}, {_where(data_config)}) could not be read as the run read "
            f"it: {type(err).__name__}: {err}") from None
    non_members = data.test if held_out == "test" else data.validation
    if non_members is None or len(non_members) == 0:
        other = "validation" if held_out == "test" else "test"
        raise AuditDataError(
            f"the run has no {held_out} split (data {name}): non-members must be held-out "
            f"examples of the same distribution. Use --held_out={other} if it has one, or "
            "audit a run configured with a held-out split.")
    return MembershipData(name, data.task, task_data.train_split(data), non_members,
                          data.input_shape, data.num_classes)


def non_private_baseline(config: Any, data: MembershipData, run_dir: str | pathlib.Path
                         ) -> Any | None:
    """The run's non-private baseline (config.model with workdir.NON_PRIVATE_FILE weights), the
    membership audit's point of comparison; None when the run did not train one."""
    from tfdpfair.trainer import registries, workdir
    path = pathlib.Path(run_dir) / workdir.NON_PRIVATE_FILE
    if not path.exists():
        return None
    model = registries.build_model(config.model, data.input_shape, data.num_classes)
    model.load_weights(path)
    return model


def check_matches_run(run_dir: str | pathlib.Path, data: MembershipData) -> None:
    """Refuses data whose training set differs in size from the run's (its metrics.json):
    the files at the path changed, and the audit would score the wrong members."""
    path = pathlib.Path(run_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    recorded = metrics.get("num_private_examples")
    if recorded is None:
        return  # a non-private run or an unfinished one: nothing recorded to compare
    unit = metrics.get("privacy_unit", "example")
    found = (np.unique(data.members.patient_ids).size if unit == "patient"
             else len(data.members))
    if int(recorded) != int(found):
        raise AuditDataError(
            f"the data found has {found} training {unit}s but the run trained on {recorded} "
            f"({path}): the files at the data path are not the run's. Point --data_override at "
            "the copy the run used.")


def membership_of(model: Any, data: MembershipData, *, batch_size: int = 256,
                  num_resamples: int = 200, seed: int = 0) -> dict:
    """membership.membership_inference of score −loss over members then non-members, by
    subgroup, with the patient or example bootstrap; plus the audit's "setup"."""
    scores = -np.concatenate([losses.split_losses(model, split, data.task, batch_size)
                              for split in (data.members, data.non_members)])
    result = membership.membership_inference(scores, data.is_member, data.groups,
                                             num_resamples=num_resamples, seed=seed,
                                             patient_id=data.patient_ids)
    result["setup"] = data.setup()
    return result
