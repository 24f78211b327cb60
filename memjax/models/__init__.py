"""Models assembled from per-layer mixer and FFN specs."""

from memjax.models.blocks import DecoderBlock
from memjax.models.decoder import DecoderLM
from memjax.models.decoder import DecoderState
from memjax.models.ffns import FFNS
from memjax.models.ffns import FFNSettings
from memjax.models.ffns import parse_ffns
from memjax.models.generate import greedy_generate
from memjax.models.hopfield_mixer import CausalHopfield
from memjax.models.hopfield_mixer import HopfieldMixerState
from memjax.models.mixers import MIXERS
from memjax.models.mixers import Mixer
from memjax.models.mixers import MixerSettings
from memjax.models.mixers import parse_mixers
from memjax.models.summary import parameter_summary
