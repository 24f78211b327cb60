"""Models assembled from a per-layer mixer spec."""

from memjax.models.decoder import DecoderBlock
from memjax.models.decoder import DecoderLM
from memjax.models.mixers import MIXERS
from memjax.models.mixers import parse_mixers
