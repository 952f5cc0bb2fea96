"""rlp: reinforcement learning as a pretraining objective (RLP) on megatron-core."""

__version__ = "0.1.0"
