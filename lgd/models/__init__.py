"""Model definitions and checkpoint I/O."""
from lgd.models.dit import DIT_CONFIGS, DiT, DiTConfig, create_dit
from lgd.models.loading import infer_dit_config, load_dit, save_dit

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "create_dit", "infer_dit_config", "load_dit", "save_dit"]
