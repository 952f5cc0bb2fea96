"""Everything that touches megatron-core: parallel init, CPU shims, model build, DDP/optimizer,
log-probs, sampling, sharded checkpoints and HF conversion.

Import the submodules directly (``from rlp.model.build import build_model``); this package
initialiser deliberately imports nothing, because ``import megatron.core`` costs ~5 s.
"""
