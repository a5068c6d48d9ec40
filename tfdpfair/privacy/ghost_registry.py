"""Every ghost-clipping rule, in the order :func:`rule_for` tries them.

The rule modules import :mod:`tfdpfair.privacy.ghost_rules` (the Rule interface and shared
helpers), so they are collected here rather than in it (imports run one way).
"""

from __future__ import annotations

from tfdpfair.privacy import ghost_rules, ghost_rules_keras, ghost_rules_tokens


def all_rules() -> list[ghost_rules.Rule]:
    """The models' and core Keras layers' rules, then DepthwiseConv2D / SeparableConv2D /
    Conv1D, then EinsumDense / Embedding."""
    return ghost_rules.RULES + ghost_rules_keras.RULES + ghost_rules_tokens.RULES


def rule_for(layer) -> ghost_rules.Rule | None:
    """The first rule that matches ``layer``'s exact class, or None (its variables then fall
    back to per-example gradients)."""
    for rule in all_rules():
        if rule.matches(layer):
            return rule
    return None
