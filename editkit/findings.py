"""The statistics behind research questions 2-5, computed from saved results.

Every function is pure (no I/O, no printing), takes a :class:`editkit.results.Results`
(or the frame an earlier function returned) and returns a tidy frame in which every
estimate has a 95% interval, by default a bootstrap over benchmark items (paired
wherever two things are compared on the same items), deterministic for a given ``seed``.

* RQ2, instruct vs base (:mod:`editkit.findings_models`): :func:`check_pairs`, :func:`decline_rate`,
  :func:`pair_difference`, :func:`confounds`.
* RQ3, scale (:mod:`editkit.findings_models`): :func:`drop_vs_scale`, :func:`scale_slope`.
* RQ4, capabilities (:mod:`editkit.findings_capabilities`): :data:`CAPABILITIES`,
  :func:`relative_drop`, :func:`capability_drops`, :func:`capability_difference_test`,
  :func:`capability_heatmap`.
* RQ5, safety (:mod:`editkit.findings_safety`): :func:`safety_table`.

Conventions shared by all (:mod:`editkit.findings_core`): a checkpoint whose model
collapsed has no items and scores the task's chance level
(:data:`editkit.viz.CHANCE_LEVELS`, 0 where a task has none); every run needs its
unedited (``n_edits == 0``) checkpoint. Frames that carry a ``replicates`` column (the
bootstrap replicates of the estimate) pass it on to the next function; drop it to display.

>>> from editkit import load_results
>>> from editkit.findings import decline_rate, pair_difference
>>> results = load_results("results/02_instruct")  # doctest: +SKIP
>>> rates = decline_rate(results, "mmlu_cloze")  # doctest: +SKIP
>>> pair_difference(rates, [("llama-2-7b", "llama-2-7b-chat")])  # doctest: +SKIP
"""

from __future__ import annotations

from .findings_capabilities import (
    CAPABILITIES,
    capability_difference_test,
    capability_drops,
    capability_heatmap,
    relative_drop,
)
from .findings_models import check_pairs, confounds, decline_rate, drop_vs_scale, pair_difference, scale_slope
from .findings_safety import SAFETY_METRICS, safety_table

__all__ = ["CAPABILITIES", "SAFETY_METRICS", "capability_difference_test", "capability_drops", "capability_heatmap",
           "check_pairs", "confounds", "decline_rate", "drop_vs_scale", "pair_difference", "relative_drop",
           "safety_table", "scale_slope"]
