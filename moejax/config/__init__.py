"""Model configuration: the ModelConfig dataclass, its YAML presets and the names of valid settings."""
