"""Synthetic tasks as numpy generators and TFDS datasets, text corpora packed for
language modelling, and grain input pipelines."""

from memjax.data import tokenizer
from memjax.data.generated_tfds import split_seed
from memjax.data.mqar import IGNORE_INDEX
from memjax.data.mqar import MqarTask
from memjax.data.mqar import generate_mqar
from memjax.data.mqar_tfds import MqarConfig
from memjax.data.mqar_tfds import MqarDataset
from memjax.data.mqar_tfds import load_mqar
from memjax.data.mqar_tfds import mqar_builder
from memjax.data.mqar_tfds import mqar_config
from memjax.data.pipeline import ArraySource
from memjax.data.pipeline import batched_dataset
from memjax.data.pipeline import eval_batches
from memjax.data.sniah import SniahTask
from memjax.data.sniah import generate_sniah
from memjax.data.sniah_tfds import SniahConfig
from memjax.data.sniah_tfds import SniahDataset
from memjax.data.sniah_tfds import load_sniah
from memjax.data.sniah_tfds import sniah_builder
from memjax.data.sniah_tfds import sniah_config
from memjax.data.text import PackedText
from memjax.data.text import load_text
