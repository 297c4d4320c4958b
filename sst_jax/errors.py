"""Errors a user can act on. Every message names the file, key or module involved."""


class SstJaxError(Exception):
    """Base class of sst-jax errors."""


class CheckpointError(SstJaxError):
    """A model checkpoint is missing, corrupt, or does not match the expected architecture."""


class AdapterError(SstJaxError):
    """A LoRA adapter file or config is missing, corrupt or uses an unsupported feature."""


class AdapterMismatchError(AdapterError):
    """An adapter does not fit a base model or another adapter (modules, shapes, base id)."""


class NumericalError(SstJaxError):
    """NaN/Inf in inputs or a matrix that is not positive definite even after damping."""


class DatasetError(SstJaxError):
    """A dataset is missing, has the wrong schema, or needs a network we do not have."""
