"""flashsemicrf: exact semi-Markov CRF inference that streams over the sequence.

The public functions (shapes in SPEC §1 and the README): log_partition,
viterbi, marginals, entropy, sample, score, nll, segments_to_labels,
labels_to_segments; Constraints (allowed label pairs, first/last labels
and durations, applied as −inf masks).
"""

from .api import Marginals, entropy, log_partition, marginals, nll, sample, score, viterbi
from .segments import labels_to_segments, segments_to_labels
from .distribution import SemiCRFDistribution
from .nn import SemiCRF
from .constraints import Constraints

__version__ = "0.1.0"

__all__ = [
    "Constraints",
    "Marginals",
    "SemiCRF",
    "SemiCRFDistribution",
    "entropy",
    "labels_to_segments",
    "log_partition",
    "marginals",
    "nll",
    "sample",
    "score",
    "segments_to_labels",
    "viterbi",
]
