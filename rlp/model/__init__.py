"""Everything that touches megatron-core: parallel init, CPU shims, model build, DDP/optimizer,
log-probs, sampling, sharded checkpoints and HF conversion.

Import the submodules directly (``from rlp.model.build import build_model``); this package
initialiser deliberately imports nothing, because ``import megatron.core`` costs ~5 s.
"""

import warnings

# megatron-core warns at import time, once per module, that transformer-engine / Apex are absent
# and it falls back to torch norms and AdamW. That is the intended CPU (and TE-less GPU) setup,
# so keep these out of users' logs; every other warning still shows.
for _message in (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed\. Falling back to Torch Norm.*",
    r".*Transformer Engine is not installed.*",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
