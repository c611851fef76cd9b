"""flashsemicrf: exact semi-Markov CRF inference that streams over the sequence.

The public functions (shapes and the model: README; each documents its
arguments): log_partition, viterbi, marginals, entropy, sample, score, nll,
segments_to_labels, labels_to_segments; the SemiCRF head and
SemiCRFDistribution; Constraints (allowed label pairs, first/last labels
and durations as -inf masks); build_info() says what the compiled extension
was built with. flashsemicrf.backends lists and chooses the backends;
docs/design.md describes the algorithm and the contract they share.
"""

from .api import Marginals, entropy, log_partition, marginals, nll, sample, score, viterbi
from .segments import labels_to_segments, segments_to_labels
from .distribution import SemiCRFDistribution
from .nn import SemiCRF
from ._extension import build_info
from .constraints import Constraints
from .posteriors import segment_posteriors, segment_posteriors_above
from .kbest import kbest

__version__ = "0.1.0"

__all__ = [
    "Constraints",
    "Marginals",
    "SemiCRF",
    "SemiCRFDistribution",
    "build_info",
    "entropy",
    "kbest",
    "labels_to_segments",
    "log_partition",
    "marginals",
    "nll",
    "sample",
    "score",
    "segments_to_labels",
    "segment_posteriors",
    "segment_posteriors_above",
    "viterbi",
]
