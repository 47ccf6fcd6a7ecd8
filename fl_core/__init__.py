"""The federated-learning core: data, victims, clients, the round loop and its hooks.

``fl_core`` knows nothing of attacks or defenses: they plug into the
:class:`~fl_core.server.Server`'s hooks.
"""

from . import malicious
from .checkpoint import load_checkpoint, save_checkpoint
from .client import Client, LocalTraining
from .data import (
    DATASETS,
    NORMALIZATION,
    SAMPLE_NAMES,
    ImageData,
    dataset_normalization,
    load_dataset,
    load_image_files,
    load_image_folder,
    load_samples,
    load_torchvision,
)
from .models import ACTIVATIONS, MODELS, ModelSpec, build_model, count_parameters
from .partition import label_skew, partition_dirichlet, partition_iid
from .registry import Registry
from .server import ClientResult, Server, fedavg, round_generator
from .train import evaluate_accuracy, train_centralized, train_victim
from .types import GroundTruth, Observation, Protocol, RoundRecord, Update

__all__ = [
    "ACTIVATIONS",
    "Client",
    "ClientResult",
    "DATASETS",
    "GroundTruth",
    "ImageData",
    "LocalTraining",
    "MODELS",
    "ModelSpec",
    "NORMALIZATION",
    "Observation",
    "Protocol",
    "Registry",
    "RoundRecord",
    "SAMPLE_NAMES",
    "Server",
    "Update",
    "build_model",
    "count_parameters",
    "dataset_normalization",
    "evaluate_accuracy",
    "fedavg",
    "label_skew",
    "load_checkpoint",
    "load_dataset",
    "load_image_files",
    "load_image_folder",
    "load_samples",
    "load_torchvision",
    "malicious",
    "partition_dirichlet",
    "partition_iid",
    "round_generator",
    "save_checkpoint",
    "train_centralized",
    "train_victim",
]
