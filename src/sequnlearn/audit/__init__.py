"""Knowledge audit: is the forget knowledge gone from the weights, or only from the output?

For every decoder layer of each model given (base, unlearned, attacked, ...) and for the forget and
the retain MCQ set, two accuracies:

- **logit lens**: the layer's output pushed through the final norm and output head and scored as
  the evaluator scores the model's output (same prompts, tokenization and continuations as
  :mod:`sequnlearn.eval.scorer`; ``letter`` or ``cloze`` style). At the last layer it *is* the
  evaluator's accuracy; at earlier layers it says how much of the answer the fixed head already reads.
- **linear probe**: the same read-out with learned weights, trained on part of the questions and
  scored on held-out ones (k-fold cross-validation, fixed seed). It can read the answer from
  directions the head ignores or that unlearning turned away from the head.

A layer where the probe stays well above the lens (and the model's answer) is a layer where the
knowledge is still in the representation but hidden from the output; where both fell to chance, it
is not linearly there any more.

The package, one module per job:

- :mod:`~sequnlearn.audit.readout`: the layer readout (answer-position states and the logit lens);
- :mod:`~sequnlearn.audit.probes`: the linear probes (their features, the fit, cross-validation);
- :mod:`~sequnlearn.audit.run`: the audit of several models (``sequnlearn audit``) into ``audit.json``;
- :mod:`~sequnlearn.audit.result`: its markdown and plot, and its section of ``sequnlearn report``.
"""

from sequnlearn.audit.probes import fit_probes, fold_ids, probe_accuracy, probe_features
from sequnlearn.audit.readout import LayerReadout, lens_accuracy, read_layers
from sequnlearn.audit.result import audit_markdown, plot_audit, report_section
from sequnlearn.audit.run import (AuditModel, AuditOptions, Loader, audit_one, layer_names, run_audit,
                                  run_target_layers, write_audit)

__all__ = ["AuditModel", "AuditOptions", "LayerReadout", "Loader", "audit_markdown", "audit_one", "fit_probes",
           "fold_ids", "layer_names", "lens_accuracy", "plot_audit", "probe_accuracy", "probe_features",
           "read_layers", "report_section", "run_audit", "run_target_layers", "write_audit"]
